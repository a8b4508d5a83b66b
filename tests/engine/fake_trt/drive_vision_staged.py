"""Drive the TensorRT backend on a staged vision tower's engines under the fake TensorRT (one process).

Usage: ``drive_vision_staged.py WORKDIR PRECISION``. Prints one JSON line: the loaded files, the chained
``run``, ``encode`` (the last stage's ``image_embeds`` left on the GPU) and ``device_call`` against ONNX
Runtime on the same precision graphs, what ``encode`` copied (nothing back to the host between stages),
the activation scratch the stages share, and a greedy chat with a screenshot on each backend.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from tests.engine.fake_trt.drive_scratch import given_memory

MODULES = ["vision", "embed", "decoder"]


def chat(workdir: Path, backend: str, precision: Optional[str], image: Path, max_tokens: int = 12) -> dict:
    """A greedy chat with ``image`` and a question, served from ``workdir`` on ``backend`` (also used by
    tests/test_vision_stages.py on ONNX Runtime): status, reply, usage, the files the backend loaded."""
    from fastapi.testclient import TestClient

    from autoglm_build.config import BuildConfig
    from autoglm_build.manifest import Manifest
    from autoglm_build.serve.app import create_app
    from autoglm_build.serve.server import build_state

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    state = build_state(cfg, workdir, backend=backend, precision=precision)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    try:
        with TestClient(create_app(state)) as client:
            resp = client.post("/v1/chat/completions", json={
                "model": state.model_ids[0], "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What is on the screen?"}]}]})
        files = sorted(state.backend.files)
    finally:
        state.backend.close()
    if resp.status_code != 200:
        return {"status": resp.status_code, "error": resp.text, "files": files}
    body = resp.json()
    return {"status": resp.status_code, "content": body["choices"][0]["message"]["content"], "usage": body["usage"],
            "image_tokens": body["usage"]["prompt_tokens_details"]["image_tokens"], "files": files}


def main() -> None:
    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.stages.samples import load_samples

    workdir, precision, image = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    feeds = load_samples(workdir / "samples" / "vision.npz")
    feed = feeds[max(feeds)][0]  # the largest pack: several images
    trt = open_backend(workdir, MODULES, "tensorrt", precision)
    ort = open_backend(workdir, MODULES, "onnxruntime", precision)
    try:
        want, got = ort.run("vision", feed), trt.run("vision", feed)
        device = trt.device_for("vision.stage0")
        device.reset()
        embeds = trt.encode("vision", feed, "image_embeds")
        traffic = dict(device.traffic)  # encode's copies: the feed's uploads only, nothing back to the host
        on_gpu = np.asarray(embeds, dtype=np.float32)
        bound = trt.device_call("vision", feed)
        bound.call()
        bound.sync()
        device = {n: np.asarray(a.numpy(), dtype=np.float32) for n, a in bound.outputs.items()}
        result = {
            "files": sorted(trt.files), "outputs": list(got), "vision_patches": trt.vision_patches,
            "images": int(feed["patch_grid"][:, 0].max()) + 1,
            "run_max_diff": float(np.abs(got["image_embeds"] - want["image_embeds"]).max()),
            "encoded": type(embeds).__name__,
            "encode_max_diff": float(np.abs(on_gpu - got["image_embeds"]).max()),
            "device_outputs": sorted(device),
            "device_max_diff": max(float(np.abs(device[n] - got[n]).max()) for n in device),
            "encode_traffic": traffic,
            "feed_bytes": int(sum(np.asarray(v).nbytes for v in feed.values())),
            "scratch_pools": trt.describe()["scratch_pools"],
            "scratch_bytes": trt.describe()["shared_scratch_bytes"],
            "given_memory": {part: sorted({given_memory(r.context) for r in runners.values()})
                             for part, runners in trt.runners.items() if part.startswith("vision")},
            "pool_addresses": {f"{key[0]}@{key[1]}": pool.buffer.ptr for key, pool in trt._pools.items()},
        }
        del embeds  # frees its buffer, before the backend closes its GPU
    finally:
        trt.close()
        ort.close()
    result["chat"] = {name: chat(workdir, name, precision, image) for name in ("tensorrt", "onnxruntime")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
