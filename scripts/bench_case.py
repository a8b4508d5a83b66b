"""What the profiling scripts share: the arguments naming one `bench` case, and that case.

    from bench_case import case_parser, load_case   # scripts/ is on sys.path when a script runs
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from autoglm_build.bench import find_case
from autoglm_build.config import BuildConfig, load_config
from autoglm_build.errors import UserError


def case_parser(doc: str, precision: bool = True) -> argparse.ArgumentParser:
    """-w/-c/-m, --batch, --case, --prompt, --past (and --precision for engines); add the rest."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("-w", "--workdir", type=Path, required=True)
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("-m", "--module", default="decoder")
    if precision:
        parser.add_argument("--precision", default="fp16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--case", default="", help="substring of the bench case (e.g. decode, prefill)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--past", type=int, default=512)
    return parser


def load_case(parser: argparse.ArgumentParser,
              argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, BuildConfig, Dict[str, Any]]:
    """Parsed arguments, the config and the named case (an unknown case: the usage and exit 2)."""
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    try:
        return args, cfg, find_case(cfg, args.module, args.batch, args.case, args.prompt, args.past)
    except UserError as exc:
        parser.error(exc.message)


def one_engine_backend(args: argparse.Namespace) -> Any:
    """The TensorRT backend of ``args.module``'s engine; a module built as several engines (a staged
    decoder: each stage, or the head stage, its own) exits 2 with one line: these scripts time one engine."""
    import sys

    from autoglm_build.manifest import Manifest
    from autoglm_build.runtime.backends import TensorRTBackend

    backend = TensorRTBackend(args.workdir, Manifest.load(args.workdir), [args.module], args.precision)
    parts = backend.parts.get(args.module, [args.module])
    if len(parts) > 1:
        backend.close()
        print(f"error: {args.module} is built as {len(parts)} engines ({', '.join(parts)}); this script times one "
              "engine: use a one-graph build (decoder.stages: 1, decoder.head_stage: false, vision.stages: 1)",
              file=sys.stderr)
        raise SystemExit(2)
    return backend
