"""The activation scratch a staged decoder's engines share, under the fake TensorRT (one process).

Usage: ``drive_scratch.py WORKDIR PRECISION``, with ``FAKE_TRT_DEVICE_MEMORY`` giving the stages' sizes.
Prints one JSON line: what ``describe()`` says of the scratch, the device address each part's phase
context was given (read from the fake's context), the pools' addresses, the fake CUDA runtime's
``cudaMalloc``/``cudaFree`` of the scratch sizes (load, then close), the chained ``run`` on each sample
step against ONNX Runtime, a staged ``device_call`` called twice without a sync between (as ``bench``'s
warmup does), a load that fails midway (what it allocated and freed), the tokens a greedy chat generates
on each backend, and the runtime's violations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from tests.engine.fake_trt.drive_staged import chat


def given_memory(context: Any) -> int:
    """The activation memory the fake context was pointed at (8.5's property, or 10's set_device_memory)."""
    return int(context.__dict__.get("_props", {}).get("device_memory") or context._memory or 0)


def scratch_history(runtime: Any, sizes: set) -> List[List[Any]]:
    """The runtime's ``[kind, address, bytes]`` of the allocations of the scratch sizes, in order."""
    return [[kind, address, size] for kind, address, size, _ in runtime.history if size in sizes]


def runs(trt: Any, ort: Any, workdir: Path) -> float:
    """The largest difference of the chained engines from ONNX Runtime over the sample steps (step 0 in the
    prefill profile, the later ones in decode, each with the cache the previous step gave)."""
    from autoglm_build.stages.samples import load_samples

    diffs = []
    for steps in load_samples(workdir / "samples" / "decoder.npz").values():
        for k, feed in enumerate(steps):
            phase = "prefill" if k == 0 else "decode"
            want, got = ort.run("decoder", feed, phase), trt.run("decoder", feed, phase)
            diffs += [float(np.abs(got[n] - want[n]).max()) for n in want]
    return max(diffs)


def failed_load(workdir: Path, precision: str, runtime: Any, sizes: set) -> Dict[str, Any]:
    """A load that fails midway (stage 1's decode runner refuses to activate, after its prefill runner and
    the pool's growth): the error and the scratch allocations the failed backend made and freed."""
    import polygraphy.backend.trt as polygraphy_trt

    from autoglm_build.runtime.backends import TensorRTBackend

    real = polygraphy_trt.TrtRunner

    class Refusing(real):
        def activate(self) -> None:
            if self.name == "decoder.stage1-decode":
                raise RuntimeError("refused on purpose")
            super().activate()

    start = len(runtime.history)
    polygraphy_trt.TrtRunner = Refusing
    try:
        from autoglm_build.manifest import Manifest

        TensorRTBackend(workdir, Manifest.load(workdir), ["embed", "decoder"], precision)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    finally:
        polygraphy_trt.TrtRunner = real
    return {"error": error, "history": [[kind, size] for kind, _, size, _ in runtime.history[start:]
                                        if size in sizes]}


def main() -> None:
    from polygraphy.cuda import cuda

    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.stages.samples import load_samples

    workdir, precision = Path(sys.argv[1]), sys.argv[2]
    runtime = cuda.G_CUDA.handle
    trt = open_backend(workdir, ["embed", "decoder"], "tensorrt", precision)
    ort = open_backend(workdir, ["embed", "decoder"], "onnxruntime", precision)
    result: Dict[str, Any] = {}
    try:
        described = trt.describe()
        sizes = set(described["shared_scratch_bytes"].values())
        result.update(
            scratch_bytes=described["shared_scratch_bytes"], pools=described["scratch_pools"],
            contexts={part: {phase: given_memory(r.context) for phase, r in runners.items()}
                      for part, runners in trt.runners.items()},
            pool_addresses=[pool.buffer.ptr for pool in trt._pools.values()],
            loaded=scratch_history(runtime, sizes), run_max_diff=runs(trt, ort, workdir))
        feed = next(iter(load_samples(workdir / "samples" / "decoder.npz").values()))[0]
        bound = trt.device_call("decoder", feed)
        bound.call()
        bound.call()  # no sync between: the first stage must wait for the last one's scratch
        bound.sync()
    finally:
        trt.close()
        ort.close()
    result["closed"] = scratch_history(runtime, sizes)
    result["failed_load"] = failed_load(workdir, precision, runtime, sizes)
    result["chat"] = {name: chat(workdir, name, precision) for name in ("tensorrt", "onnxruntime")}
    result["violations"] = list(runtime.violations)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
