"""Where an engine's time goes: TensorRT's per-layer profiler (IProfiler) on one `bench` case.

Runs on the GPU harness (Python 3.9, TensorRT 8.5): the engine is loaded as `bench` loads it
(sidecar and sha256 checks), the case's inputs are put on the GPU once, and TensorRT reports each
layer's time over the iterations. Prints the layers that take the most time, with their share, and
how much of the total the Myelin ("ForeignNode") and reformatting layers take.

    trtpy scripts/trt_layer_profile.py -w build/x -c configs/x.yaml -m decoder --precision int8 --batch 8 \
        --case decode
"""

from __future__ import annotations

from collections import defaultdict
from typing import List

from bench_case import case_parser, load_case, one_engine_backend  # scripts/bench_case.py

from autoglm_build.engine import tensorrt as trt_env


def main(argv: List[str] = None) -> int:
    parser = case_parser(__doc__)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    args, cfg, case = load_case(parser, argv)
    trt = trt_env.load()
    backend = one_engine_backend(args)
    call, sync, _ = backend.device_call(args.module, case["feed"], case["phase"])
    for _ in range(3):
        call()
    sync()
    runner = backend.runner(args.module, case["phase"])

    totals = defaultdict(float)

    class Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):
            totals[layer_name] += ms

    runner.context.profiler = Profiler()
    for _ in range(args.iters):
        call()
        sync()
    backend.close()
    total = sum(totals.values())
    print(f"{args.module} {args.precision} {case['case']} batch {args.batch}: {total / args.iters:.3f} ms per run "
          f"in {len(totals)} layers (TensorRT {trt.__version__}, {trt_env.gpu()['name']})")
    kinds = defaultdict(float)
    for name, ms in totals.items():
        kind = ("myelin" if "ForeignNode" in name or "myl" in name.lower() else
                "reformat" if "reformat" in name.lower() or "copy" in name.lower() else "other")
        kinds[kind] += ms
    print("  share: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(kinds.items())))
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {ms / args.iters:8.3f} ms {100 * ms / total:5.1f}%  {name[:150]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
