"""The whole pipeline on this CPU: a cold build into a fresh workdir, then the same run with every stage cached.

    python benchmarks/pipeline_cpu.py [-c configs/autoglm-phone-tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, workdir: Path) -> tuple:
    cmd = [sys.executable, "-m", "autoglm_build", "run", "-c", config, "-w", str(workdir), "--json", "-q"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"run failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    outcomes = json.loads(out.stdout)["outcomes"]
    return wall, sum(o["status"] == "cached" for o in outcomes), len(outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-tiny.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoglm-bench-") as tmp:
        workdir = Path(tmp) / "build"
        cold, cold_cached, n = run(args.config, workdir)
        warm, warm_cached, _ = run(args.config, workdir)
    print(f"pipeline on CPU ({Path(args.config).name}: export, optimize, samples, calibrate int8, calibrate fp16)")
    print(f"{'':8} {'wall s':>8} {'stage/module records cached':>28}")
    print(f"{'cold':8} {cold:>8.2f} {f'{cold_cached}/{n}':>28}")
    print(f"{'cached':8} {warm:>8.2f} {f'{warm_cached}/{n}':>28}")
    print(f"cached/cold: {warm / cold:.3f} ({cold / warm:.0f}x faster)")
    return 0 if warm_cached == n else 1


if __name__ == "__main__":
    sys.exit(main())
