"""The sampler's pick at the real vocabulary: one decode step's host work between the logits and the next
launch, for ``--rows`` rows of 151,552 logits, every id producible (the checkpoint's tokenizer; the tiny
tokenizer used elsewhere lets only 1,237 ids through, which hides this cost).

Two request shapes, each timed through the path before the greedy rows' pass (``Sampler._pick`` over
every row) and through ``Sampler.pick`` as the server runs it, side by side in one run:

- ``agent``: the phone agent's requests (temperature 0, top-p 0.85, frequency penalty 0.2), ~200 ids
  generated per row;
- ``sampled``: ``benchmarks/serve_load.py``'s (temperature 0.7, top-p 1, a seed per request).

Measured on the 2-core dev CPU (8 rows, median of 20 picks, another job sharing the CPU), us per pick,
full pass -> now: agent 21,893 -> 1,039 (the same ids); sampled 40,064 -> 44,493 (the same full pass
both ways: the sampling rows still go through it, 5 ms a row here). Twelfth session (medians of 9, the CPU
to itself), after the float32 pass from the temperature on and the two-level draw (``Sampler._draw``):
agent 10,986-11,560 -> 617-634; sampled 5,478-6,332 -> 5,120-5,275, 0.7 ms a row.

    python benchmarks/sampler_pick.py [--rows 8] [--vocab 151552] [--repeat 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoglm_build.runtime.generation import Sampler, SamplingParams, UniformDraws  # noqa: E402

# </think> and the stops (<|endoftext|>, <|user|>, <|observation|>) where GLM-4's tokenizer has them; the
# specials from 151329 on are never sampled but these
CLOSE, STOPS = 151351, (151329, 151336, 151338)


def tokenizer(vocab: int) -> SimpleNamespace:
    """What the sampler reads of a ChatTokenizer: every id producible but the special ones."""
    allowed = np.ones(vocab, dtype=bool)
    allowed[151329:] = False
    allowed[list(STOPS)] = True
    return SimpleNamespace(ids={"</think>": CLOSE}, stop_ids=set(STOPS), allowed=allowed)


def rows(sampler: Sampler, count: int, params: SamplingParams, rng: np.random.Generator) -> list:
    out = []
    for slot in range(count):
        sampler.join(slot)
        for token in rng.integers(0, 150000, 200):
            sampler.count(slot, int(token))
        generator = np.random.default_rng(slot)
        req = SimpleNamespace(params=params, thinking=False, reasoning_tokens=0, rng=generator,
                              draws=UniformDraws(generator))
        out.append(SimpleNamespace(slot=slot, req=req))
    return out


def median_us(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=151552)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sampler = Sampler(tokenizer(args.vocab), slots=args.rows)
    logits = (rng.standard_normal((args.rows, args.vocab)) * 3).astype(np.float32)
    shapes = {"agent": SamplingParams(temperature=0.0, top_p=0.85, frequency_penalty=0.2),
              "sampled": SamplingParams(temperature=0.7, top_p=1.0)}
    print(f"sampler pick, {args.rows} rows x {args.vocab} logits, us per pick (median of {args.repeat})")
    print(f"{'requests':10} {'full pass':>10} {'pick now':>10}  same ids")
    for name, params in shapes.items():
        batch = rows(sampler, args.rows, params, rng)

        def before(batch=batch):
            return list(sampler.ids[sampler._pick(np.take(logits, sampler.ids, axis=1), batch)])

        def now(batch=batch):
            return sampler.pick(logits, batch)

        # greedy: both paths' ids compared; sampled: not comparable here (each pick draws from the rows' generators)
        same = "-" if params.temperature > 0 else ("yes" if before() == now() else "NO")
        print(f"{name:10} {median_us(before, args.repeat):10.0f} {median_us(now, args.repeat):10.0f}  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
