"""Served greedy generations on the TensorRT backend (fake TensorRT, one process) and on ONNX Runtime.

Usage: ``drive_serve.py WORKDIR PRECISION [host|overlap [select]|graphs|select]``. Prints one JSON line:
``tests.runtime.device_scenario``'s result per backend (``tensorrt``, ``onnxruntime``). With ``host``, the
TensorRT backend keeps the KV cache on the host and runs each step through Polygraphy's ``infer`` (the path
before the device cache), so a test can show that its checks tell the two apart. With ``overlap``,
``tests.runtime.overlap_scenario``'s cases on the TensorRT backend alone (the scheduler's decode overlap on
and off). With ``graphs``, the scenario on TensorRT with decode steps as CUDA graphs and without, and the
fake runtime's graph launches. With ``select``, the scenario (and seeded sampling) with the tokens chosen on the GPU,
with CUDA graphs and without, and with the host sampler.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from autoglm_build.runtime import backends
    from tests.runtime.device_scenario import scenario

    workdir, precision = Path(sys.argv[1]), sys.argv[2]
    if sys.argv[3:4] == ["overlap"]:  # "overlap select": with the tokens chosen on the GPU
        from tests.runtime.overlap_scenario import on_workdir

        print(json.dumps({"tensorrt": on_workdir(workdir, "tensorrt", precision, select=sys.argv[4:] == ["select"])}))
        return
    if sys.argv[3:] == ["graphs"]:  # decode steps as CUDA graphs against the same steps engine by engine
        from tests.runtime.device_scenario import _fake_cudart

        out = {"graphs": scenario(workdir, "tensorrt", precision, graphs=True)}
        fake = _fake_cudart()
        out["fake"] = {"launches": fake.launches, "violations": list(fake.violations)}
        out["plain"] = scenario(workdir, "tensorrt", precision)
        fake.refuse_capture = True  # a runtime that lets no step be captured: engine by engine, graphs off
        out["refused"] = scenario(workdir, "tensorrt", precision, graphs=True, cases=("solo", "joining"))
        out["fake"]["violations_after_refusals"] = list(fake.violations)
        print(json.dumps(out))
        return
    if sys.argv[3:] == ["select"]:  # the tokens chosen on the GPU against the host sampler's, graphs on and off
        from tests.runtime.device_scenario import _fake_cudart

        cases = ("solo", "batched", "joining", "agent", "sampled")
        out = {"select": scenario(workdir, "tensorrt", precision, cases=cases + ("shared", "limit"), select=True),
               "select_graphs": scenario(workdir, "tensorrt", precision, cases=cases, select=True, graphs=True),
               "host": scenario(workdir, "tensorrt", precision, cases=cases)}
        from autoglm_build.runtime import device_select

        def refused(*args, **kwargs):
            raise RuntimeError("TensorRT aborted while building the select engine")
        device_select.engine_path = refused  # a GPU whose TensorRT cannot build it: the host samples, and says why
        out["unbuilt"] = scenario(workdir, "tensorrt", precision, cases=("solo",), select=True)
        out["fake"] = {"violations": list(_fake_cudart().violations)}
        print(json.dumps(out))
        return
    if sys.argv[3:] == ["host"]:
        backends.TensorRTBackend.kv_cache = backends.Backend.kv_cache
    print(json.dumps({name: scenario(workdir, name, precision) for name in ("tensorrt", "onnxruntime")}))


if __name__ == "__main__":
    main()
