"""Peak RSS of `autoglm-build export --checkpoint` per module, against the module's FP32 size.

Each module is exported in a fresh process (the CLI, through its entry point), so each peak is that
export's alone; the peak is the child's ``ru_maxrss``. The checkpoint is written first in the
published layout (scripts/make_layout_checkpoint.py, BF16 shards) unless ``--checkpoint`` names one.
The FP32 size is the module's parameters x 4 bytes (what the export's manifest records as
``parameters``); ``base`` is the RSS of a process that has imported what export imports.

    python benchmarks/export_memory.py -c benchmarks/autoglm-phone-mid.yaml -m decoder
    python benchmarks/export_memory.py -c configs/autoglm-phone-9b-2layer.yaml -m decoder -m embed

Figures and what bounds them: docs/decisions.md, "Streaming export and the published checkpoint layout".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("import resource, torch, transformers, onnx, onnxruntime, autoglm_build.stages.export;"
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def child_peak_mib(cmd: List[str]) -> Tuple[float, float, str]:
    """(peak RSS MiB, wall s, stdout) of ``cmd`` in a child process (its own ``ru_maxrss``, from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}): {err.read().decode()[-3000:]}")
        return usage.ru_maxrss / 1024, wall, out.read().decode()


def export_one(config: str, checkpoint: Path, module: str, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "autoglm_build", "export", "-c", config, "-w", str(workdir),
           "--checkpoint", str(checkpoint), "-m", module, "--json", "-q"]
    peak, wall, stdout = child_peak_mib(cmd)
    record = json.loads(stdout)["outcomes"][0]["record"]
    fp32 = record["params"]["parameters"] * 4 / 2**20
    return {"module": module, "fp32_mib": fp32, "peak_mib": peak, "wall_s": wall,
            "recorded_peak_mib": record["metrics"].get("peak_rss_mib")}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=str(ROOT / "configs" / "autoglm-phone-9b-2layer.yaml"))
    parser.add_argument("-m", "--module", action="append", help="modules to export, one process each")
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint (default: write one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="autoglm-mem-") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "checkpoint"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_layout_checkpoint.py"), "-c", args.config,
                            "-o", str(checkpoint)], check=True, capture_output=True)
        base = int(subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                                  check=True, cwd=ROOT).stdout) / 1024
        print(f"export peak RSS ({Path(args.config).name}; base {base:.0f} MiB after imports)")
        print(f"{'module':15} {'fp32 MiB':>9} {'peak MiB':>9} {'peak/fp32':>9} {'(peak-base)/fp32':>16} "
              f"{'recorded':>9} {'wall s':>7}")
        for k, module in enumerate(args.module or ["decoder"]):
            row = export_one(args.config, checkpoint, module, Path(tmp) / f"w{k}")
            recorded = row["recorded_peak_mib"]  # the export record's own peak_rss_mib
            print(f"{row['module']:15} {row['fp32_mib']:>9.0f} {row['peak_mib']:>9.0f} "
                  f"{row['peak_mib'] / row['fp32_mib']:>9.2f} {(row['peak_mib'] - base) / row['fp32_mib']:>16.2f} "
                  f"{recorded if recorded is not None else '-':>9} {row['wall_s']:>7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
