"""benchmarks/step_overhead.py's stand-ins run the real scheduler: with the tokens chosen on the "GPU" every decode step
after the first is launched ahead on the ids the one before leaves, and every row gets its tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import step_overhead  # noqa: E402


def test_the_select_stand_in_launches_steps_ahead_and_finishes_every_row():
    sched, prompts = step_overhead.setup(rows=4, overlap=True, select=True)
    assert sched.selecting
    events = {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        params = step_overhead.SamplingParams(max_tokens=16, ignore_eos=True, seed=i, temperature=0.7)
        sched.submit(step_overhead.Request(prompt, params, emit=lambda e, i=i: events[i].append(e)))
    sched.run_until_idle()
    stats = sched.stats()
    assert stats["overlapped_steps"] >= stats["decode_steps"] - 2 > 0 and sched.fallbacks == 0
    assert all(e[-1]["type"] == "done" and e[-1]["usage"]["completion_tokens"] == 16 for e in events.values())


def test_the_select_stand_in_times_its_steps():
    wall, cpu = step_overhead.run_scheduler(SimpleNamespace(rows=2, tokens=8, gpu_us=0.0, select=True, overlap=True),
                                            temperature=0.7)
    assert wall > 0 and cpu > 0
