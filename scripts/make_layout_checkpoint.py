#!/usr/bin/env python
"""Write a checkpoint with seeded random weights in the published GLM-4.1V-9B / AutoGLM-Phone-9B layout.

BF16 safetensors shards with ``model.safetensors.index.json`` and transformers' ``config.json``
(:mod:`autoglm_build.layout`), so ``export --checkpoint`` runs its real path at any size, the 9B
model's included, without the real weights. Memory stays near 100 MB whatever the size; the same
seed writes the same bytes.

    .venv/bin/python scripts/make_layout_checkpoint.py -c configs/autoglm-phone-9b.yaml -o /data/ckpt-9b
    .venv/bin/python scripts/make_layout_checkpoint.py -c configs/autoglm-phone-tiny.yaml -o /tmp/ckpt --shard-mib 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_build.config import load_config  # noqa: E402
from autoglm_build.errors import UserError  # noqa: E402
from autoglm_build.layout import DEFAULT_SHARD_MIB, DTYPES, write_checkpoint  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="build config whose sizes to take")
    parser.add_argument("-o", "--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="tensor dtype (default bf16)")
    parser.add_argument("--shard-mib", type=float, default=DEFAULT_SHARD_MIB,
                        help="largest shard in MiB (default: 5 GB, save_pretrained's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="shards written at once (threads; same bytes whatever the count; default 1)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    started = time.perf_counter()

    def progress(name: str, nbytes: int) -> None:
        print(f"{name}: {nbytes / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    try:
        summary = write_checkpoint(cfg, args.out, args.dtype, args.shard_mib, args.seed, progress, args.workers)
    except UserError as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.out}: {len(summary['files'])} files, {summary['tensors']} tensors, "
          f"{summary['parameters']:,} parameters, {summary['total_size'] / 2**30:.2f} GiB {args.dtype}, "
          f"{time.perf_counter() - started:.0f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
