"""The ``samples`` stage alone (``run`` makes them with every other CPU stage): on the GPU machine the
full-width slice is exported, optimized and calibrated FP16 only, and verify still needs its samples.

    python scripts/samples_stage.py -c CONFIG -w WORKDIR -m MODULE [-m MODULE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.samples import SamplesStage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("-w", "--workdir", type=Path, required=True)
    parser.add_argument("-m", "--module", action="append", required=True)
    args = parser.parse_args()
    cfg = load_config(args.config)
    Pipeline(cfg, args.workdir, [SamplesStage()], args.module, reporter=Reporter(0),
             config_path=str(args.config)).run()


if __name__ == "__main__":
    main()
