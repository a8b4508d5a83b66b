"""Drive the TensorRT backend on a staged decoder's engines under the fake TensorRT (one process).

Usage: ``drive_staged.py WORKDIR PRECISION``. Prints one JSON line: the loaded files, the chained
``run`` and ``device_call`` against ONNX Runtime on the same precision graphs, and the tokens a
greedy chat generates on each backend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def chat(workdir: Path, backend: str, precision: str) -> str:
    from fastapi.testclient import TestClient

    from autoglm_build.config import BuildConfig
    from autoglm_build.manifest import Manifest
    from autoglm_build.serve.app import create_app
    from autoglm_build.serve.server import build_state

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    state = build_state(cfg, workdir, backend=backend, precision=precision)
    try:
        with TestClient(create_app(state)) as client:
            resp = client.post("/v1/chat/completions", json={
                "model": state.model_ids[0], "messages": [{"role": "user", "content": "Open WeChat"}],
                "max_tokens": 12, "temperature": 0})
    finally:
        state.backend.close()
    return resp.json()["choices"][0]["message"]["content"]


def kept(trt, workdir: Path) -> float:
    """Two prefill feeds of different lengths bound at once (``keep``) run in any order, and as one
    ``device_chain``, each giving what Polygraphy's ``infer`` gives for it: the largest difference."""
    from autoglm_build.stages.samples import load_samples

    feeds = [f for fs in load_samples(workdir / "samples" / "decoder.npz").values() for f in fs
             if f["inputs_embeds"].shape[1] > 1]
    first = feeds[0]
    second = next(f for f in feeds if f["inputs_embeds"].shape != first["inputs_embeds"].shape)
    want = [trt.run("decoder", f) for f in (first, second)]
    bound = [trt.device_call("decoder", f, keep=True) for f in (first, second)]
    diffs = []
    for k in (1, 0, 1):  # the later binding first, then the earlier one: each re-sets its shapes
        bound[k].call()
        bound[k].sync()
        diffs += [float(np.abs(np.asarray(a.numpy(), np.float32) - want[k][n]).max())
                  for n, a in bound[k].outputs.items()]
    chained = trt.device_chain("decoder", [first, second])
    chained.call()
    chained.sync()
    diffs += [float(np.abs(np.asarray(a.numpy(), np.float32) - want[1][n]).max()) for n, a in chained.outputs.items()]
    return max(diffs)


def main() -> None:
    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.stages.samples import load_samples

    workdir, precision = Path(sys.argv[1]), sys.argv[2]
    feed = next(iter(load_samples(workdir / "samples" / "decoder.npz").values()))[0]
    trt = open_backend(workdir, ["embed", "decoder"], "tensorrt", precision)
    ort = open_backend(workdir, ["embed", "decoder"], "onnxruntime", precision)
    try:
        want, got = ort.run("decoder", feed), trt.run("decoder", feed)
        bound = trt.device_call("decoder", feed)
        bound.call()
        bound.sync()
        on_device = {n: np.asarray(a.numpy(), dtype=np.float32) for n, a in bound.outputs.items()}
        result = {
            "files": sorted(trt.files), "outputs": list(got), "context": trt.context,
            "run_max_diff": max(float(np.abs(got[n] - want[n]).max()) for n in want),
            "device_outputs": sorted(on_device),
            "device_max_diff": max(float(np.abs(on_device[n] - got[n]).max()) for n in on_device),
            "kept_max_diff": kept(trt, workdir),
            "scratch_pools": trt.describe()["scratch_pools"],
        }
    finally:
        trt.close()
    result["chat"] = {name: chat(workdir, name, precision) for name in ("tensorrt", "onnxruntime")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
