"""Served greedy generations on a staged decoder placed on GPUs, under the fake TensorRT (one process).

Usage: ``drive_devices.py WORKDIR PRECISION DEVICES [MODE]``, ``DEVICES`` ``none`` (no placement) or a list
(``0,1``), run with ``FAKE_CUDA_DEVICES`` set. Prints one JSON line: ``tests.runtime.device_scenario``'s
result on the TensorRT backend (``onnxruntime`` too with ``MODE`` ``ort``), the fake CUDA runtime's
summary (violations, bytes allocated per device, the devices each engine ran on and touched, peer
copies) and the error the run raised, if any. Other modes break the placement on purpose, so a test can
show that the fake runtime's checks catch each mistake:

- ``host``: the host KV cache through Polygraphy's ``infer`` (placement honoured, activations via the host);
- ``d2d``: the activations cross as a plain device-to-device copy instead of a peer copy;
- ``no-wait``: the streams of the two GPUs are not ordered (no event waits around the peer copy);
- ``no-back-wait``: the sending GPU's stream does not wait for the peer copy before it writes the
  activations again (seen on a long prompt's second prefill chunk, once the buffers no longer grow:
  a buffer that grows is freed, and ``cudaFree`` waits for the device);
- ``one-gpu-cache``: the KV cache's buffers all on the first GPU while the stages run on theirs.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _break(mode: str) -> None:
    from autoglm_build.runtime import backends, device, device_cache

    if mode == "host":
        backends.TensorRTBackend.kv_cache = backends.Backend.kv_cache
    elif mode == "d2d":
        def cross(before, after, source, nbytes):
            target = after.buffer("hidden-in", nbytes)
            after.device.wait_for(before.device)
            after.device.copy(target, source, nbytes)
            before.device.wait_for(after.device)
            return target
        device_cache.DeviceKVCache._cross = staticmethod(cross)
    elif mode == "no-wait":
        device.Device.wait_for = lambda self, other: None
    elif mode == "no-back-wait":
        def forward_only(before, after, source, nbytes):
            target = after.buffer("hidden-in", nbytes)
            after.device.wait_for(before.device)
            after.device.peer(target, source, nbytes, before.device)
            return target
        device_cache.DeviceKVCache._cross = staticmethod(forward_only)
    elif mode == "one-gpu-cache":
        shards_of = device_cache.shards_of

        def one_gpu(backend, spec):
            shards = shards_of(backend, spec)
            for shard in shards:
                shard.device = backend.device
            return shards
        device_cache.shards_of = one_gpu


def long_twice(workdir: Path, precision: str, devices):
    """A prompt longer than the prefill chunk (the phone agent's system prompt), generated twice by one
    scheduler: the second time every buffer already has its size, so nothing is freed between chunks."""
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import BuildConfig
    from autoglm_build.manifest import Manifest
    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.runtime.generation import Scheduler
    from autoglm_build.runtime.text import ChatTokenizer, Segment
    from tests.runtime.device_scenario import SYSTEM, _generate

    cfg = BuildConfig.model_validate(Manifest.load(workdir).config)
    tok = ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size)
    backend = open_backend(workdir, ["embed", "decoder"], "tensorrt", precision, devices=devices)
    try:
        sched = Scheduler(backend, cfg, tok, max_batch=2, queue_size=8, context=cfg.engine.context,
                          prefix_cache_bytes=0)
        prompt = tok.chat_prompt([("system", [Segment(text=SYSTEM)]), ("user", [Segment(text="打开蓝牙")])], False)
        assert len(prompt.ids) > cfg.engine.prefill_chunk
        return [_generate(sched, [prompt])[0] for _ in range(2)]
    finally:
        backend.close()


def main() -> None:
    from polygraphy.cuda import cuda

    from tests.runtime.device_scenario import scenario

    workdir, precision, placed = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "device"
    devices = None if placed == "none" else [int(d) for d in placed.split(",")]
    _break(mode)
    cases = ("solo", "joining", "agent") if mode in ("device", "host", "ort") else ("solo",)
    result = {"mode": mode, "devices": devices, "error": None}
    try:
        if mode != "no-back-wait":
            result["tensorrt"] = scenario(workdir, "tensorrt", precision, devices, cases)
        if mode in ("device", "no-back-wait"):
            result["long_twice"] = long_twice(workdir, precision, devices)
    except Exception as exc:  # noqa: BLE001 - the modes that break the placement expect one
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    result["fake"] = cuda.G_CUDA.handle.summary()
    if mode == "ort":
        result["onnxruntime"] = scenario(workdir, "onnxruntime", precision, None, cases)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
