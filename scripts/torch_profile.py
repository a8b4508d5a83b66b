"""Where PyTorch eager's time goes on one `bench` case: torch.profiler's kernels against the wall clock.

Runs on the GPU machine's own Python (torch): the module is built as `bench --backends torch` builds
it (same weights, fp16 on CUDA), the case's inputs are put on the device once, and the profiler
records the iterations. Prints the wall time per call, the GPU kernels' time per call and their
count, the share of the wall time the GPU is busy (low: the step is bound by the host launching
kernels, not by the GPU), and the kernels that take the most time.

    python3 scripts/torch_profile.py -c configs/x.yaml -w build/x -m decoder --batch 1 --case decode
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import List

from bench_case import case_parser, load_case  # scripts/bench_case.py

from autoglm_build.bench import _Torch


def main(argv: List[str] = None) -> int:
    parser = case_parser(__doc__, precision=False)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--top", type=int, default=10)
    args, cfg, case = load_case(parser, argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = _Torch(cfg, args.workdir, args.module)
    call = runner.prepare(case)
    for _ in range(5):
        call()
    runner.sync()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.iters):
            call()
        runner.sync()
        wall = (time.perf_counter() - start) / args.iters
    kernels = defaultdict(lambda: [0, 0.0])  # name -> [count, microseconds]
    for event in prof.events():
        on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
        if cuda and not on_device:
            continue
        if not cuda and (event.cpu_parent is not None or not event.name.startswith("aten::")):
            continue  # on a CPU: the top-level aten ops
        kernels[event.name][0] += 1
        kernels[event.name][1] += event.time_range.elapsed_us()
    count = sum(n for n, _ in kernels.values()) / args.iters
    busy = sum(us for _, us in kernels.values()) / args.iters / 1e3
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    unit = "kernels" if cuda else "top-level ops"
    print(f"{args.module} {runner.label} {case['case']} batch {args.batch} on {where} (torch {torch.__version__}): "
          f"wall {1e3 * wall:.3f} ms per call, {count:.0f} {unit} per call taking {busy:.3f} ms "
          f"({100 * busy / (1e3 * wall):.0f}% of the wall time)")
    for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"  {us / args.iters / 1e3:8.3f} ms {n / args.iters:5.1f}x  {name[:140]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
