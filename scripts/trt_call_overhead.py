"""How much of a TensorRT call is the host: one `bench` case run three ways, side by side.

Runs on the GPU harness (Python 3.9, TensorRT). For the case's inputs, already on the GPU:

- ``polygraphy``: ``TrtRunner.infer(..., copy_outputs_to_host=False)``: per-call input checks, shape
  and address updates, output-allocator callbacks and a stream synchronization;
- ``bound``: ``TensorRTBackend.device_call``: shapes and addresses set once, one
  ``execute_async_v3`` per call (what `bench` times);
- ``cuda graph``: the bound call captured once into a CUDA graph and replayed (``cudaGraphLaunch``):
  no per-call TensorRT enqueue on the host at all. Skipped, with the reason, where capture fails.

    trtpy scripts/trt_call_overhead.py -w build/x -c configs/x.yaml -m decoder --precision fp16 --batch 1 \
        --case decode
"""

from __future__ import annotations

import ctypes
from typing import Callable, List, Tuple

import numpy as np
from bench_case import case_parser, load_case, one_engine_backend  # scripts/bench_case.py

from autoglm_build.bench import timed
from autoglm_build.engine import tensorrt as trt_env


def graph_replay(call: Callable[[], None], stream) -> Tuple[Callable[[], None], Callable[[], None]]:
    """``call`` (one enqueue on ``stream``) captured into a CUDA graph: ``(launch, free)``."""
    from polygraphy import cuda

    cudart = cuda.wrapper().handle
    ptr = ctypes.c_void_p(stream.ptr)

    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} returned CUDA error {status}")

    graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
    check(cudart.cudaStreamBeginCapture(ptr, ctypes.c_int(0)), "cudaStreamBeginCapture")  # global mode
    try:
        call()
    finally:
        check(cudart.cudaStreamEndCapture(ptr, ctypes.byref(graph)), "cudaStreamEndCapture")
    check(cudart.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)),
          "cudaGraphInstantiateWithFlags")

    def launch() -> None:
        check(cudart.cudaGraphLaunch(exe, ptr), "cudaGraphLaunch")

    def free() -> None:
        cudart.cudaGraphExecDestroy(exe)
        cudart.cudaGraphDestroy(graph)

    return launch, free


def main(argv: List[str] = None) -> int:
    parser = case_parser(__doc__)
    parser.add_argument("--min-time", type=float, default=1.0)
    args, cfg, case = load_case(parser, argv)
    from polygraphy import cuda

    trt = trt_env.load()
    backend = one_engine_backend(args)
    runner = backend.runner(args.module, case["phase"])
    print(f"{args.module} {args.precision} {case['case']} batch {args.batch} "
          f"(TensorRT {trt.__version__}, {trt_env.gpu()['name']}):", flush=True)
    feed = {}
    try:
        for name, host in backend._cast(args.module, case["feed"]).items():
            feed[name] = host  # an empty cache stays on the host, as `device_call` allows
            if host.size:
                feed[name] = cuda.DeviceArray(shape=host.shape, dtype=host.dtype).copy_from(host)
        base = report("polygraphy", timed(lambda: runner.infer(feed, copy_outputs_to_host=False),
                                          runner.stream.synchronize, 3, 10, args.min_time), 0.0)
        call, sync, _ = backend.device_call(args.module, case["feed"], case["phase"])
        report("bound", timed(call, sync, 3, 10, args.min_time), base)
        call()  # once more outside the capture: TensorRT settles anything it defers to the first enqueue
        sync()
        try:
            launch, free = graph_replay(call, runner.stream)
        except (RuntimeError, AttributeError) as exc:
            print(f"  cuda graph: not captured ({exc})")
        else:
            report("cuda graph", timed(launch, sync, 3, 10, args.min_time), base)
            free()
    finally:
        for array in feed.values():
            if hasattr(array, "free"):
                array.free()
        backend.close()
    return 0


def report(label: str, times: List[float], base: float) -> float:
    """One line: p50/p90 and the speed-up over ``base`` (the Polygraphy p50, or 0 for this one)."""
    p50 = float(np.median(times))
    print(f"  {label:<11} p50 {1e3 * p50:8.3f} ms  p90 {1e3 * float(np.percentile(times, 90)):8.3f} ms  "
          f"{(base or p50) / p50:5.2f}x vs polygraphy  ({len(times)} iterations)", flush=True)
    return p50


if __name__ == "__main__":
    raise SystemExit(main())
