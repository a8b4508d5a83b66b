"""``benchmarks/serve_load.py``'s paired runs on ONNX Runtime: each engine-alone run right before a server run, the
ratio the median of the pairs' ratios (:func:`paired_runs`), so a machine whose speed drifts between runs moves both
halves of a pair, not the ratio."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY


def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load_pairs_under_test", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_run_engine_then_server_and_ratio_each_pair(monkeypatch):
    """A machine whose speed changes from one pair to the next by up to 2.5x: every pair's ratio is the server's
    share at that speed (0.6); each engine run comes right before its server run, on the scheduler's cores, and the
    server run on the HTTP core."""
    load = serve_load()
    speeds = iter([1.0, 0.5, 0.9, 0.4, 1.0, 0.7])  # one speed per pair: 3 pairs at 1 stream, then 3 at 8
    events = []
    now = {}

    def engine_rate(backend, cfg, tokenizer, streams, ids, steps, select=False):
        now["speed"] = next(speeds)
        events.append(("engine", streams, frozenset(os.sched_getaffinity(0))))
        return {"tokens_per_s": 1000.0 * streams * now["speed"], "cache": "bound"}

    async def phase(url, streams, max_tokens, timeout, light=True):
        events.append(("server", streams, frozenset(os.sched_getaffinity(0))))
        return {"decode_per_s": 600.0 * streams * now["speed"], "errors": 0, "first_error": ""}

    monkeypatch.setattr(load, "engine_rate", engine_rate)
    monkeypatch.setattr(load, "phase", phase)
    monkeypatch.setattr(load, "prompt_ids", lambda args: ([1, 2, 3], None))
    args = type("Args", (), {"repeat": 3, "max_tokens": 8, "timeout": 10.0})()
    cores = sorted(os.sched_getaffinity(0))
    split = (frozenset(cores[:1]), frozenset(cores[-1:])) if len(cores) > 1 else None
    before = os.sched_getaffinity(0)
    try:
        engine, served, ratios = load.paired_runs(args, None, None, "http://x", split)
    finally:
        os.sched_setaffinity(0, before)
    assert [(kind, streams) for kind, streams, _ in events] == [("engine", 1), ("server", 1)] * 3 + \
        [("engine", 8), ("server", 8)] * 3
    if split is not None:
        assert all(where == (split[0] if kind == "engine" else split[1]) for kind, _, where in events)
    assert ratios == {1: pytest.approx([0.6] * 3), 8: pytest.approx([0.6] * 3)}
    assert engine[8]["tokens_per_s"] == 5600.0 and engine[8]["runs"] == [3200.0, 8000.0, 5600.0]  # the median run
    if split is not None:
        assert engine[8]["cores"] == ",".join(str(c) for c in sorted(split[0]))
    assert served[8]["decode_per_s"] == pytest.approx(3360.0) and served[8]["errors"] == 0


def test_paired_benchmark_runs_on_onnx_runtime_and_prints_the_pairs(random_tiny_build: Path):
    """The benchmark itself, end to end on the tiny build (2 pairs of 8-token streams): the engine stays open beside
    the server, the table has the pairs' ratio range, the last line is the median of the 8-stream pairs' ratios."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "-c", str(TINY), "-w",
                          str(random_tiny_build), "--backend", "onnxruntime", "--clients", "0", "--repeat", "2",
                          "--max-tokens", "8"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    # on two cores or more, each engine run on the scheduler's (every core but the last), as the server's scheduler
    cores = sorted(os.sched_getaffinity(0))
    where = ",".join(str(c) for c in cores[:-1]) if len(cores) > 1 else ",".join(str(c) for c in cores)
    assert any(line.startswith(f"2 pairs per stream count, each an engine-alone run (on CPU {where}) then a server run")
               for line in lines), out.stdout
    row = next(line.split() for line in lines if line.split()[:1] == ["8"])
    low, high = (float(x) for x in row[-1].split("-"))
    ratio = float(lines[-1].rsplit(" ", 1)[1])
    assert lines[-1].startswith("serve/engine decode rate: ")
    assert low - 0.005 <= ratio <= high + 0.005 and float(row[3]) == ratio  # two pairs: the mean of their ratios
