"""The ONNX Runtime backend's intra-op pool placed on the cores it is given (``serve.cpu_affinity``: the scheduler's),
not wherever the OS puts it: :func:`~autoglm_build.runtime.backends.intra_op_affinities` and the threads the sessions
start, as /proc sees them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autoglm_build.runtime.backends import intra_op_affinities, open_backend


def test_each_pool_thread_gets_one_of_the_cores_after_the_first_numbered_from_1():
    assert intra_op_affinities([0, 1, 2], 3) == "2;3"  # the caller's thread keeps core 0 to itself
    assert intra_op_affinities([7, 2, 5], 3) == "6;8"  # sorted, the OS's numbers plus one
    assert intra_op_affinities([0, 1], 4) == "2;1;2"  # more threads than cores: in turn
    assert intra_op_affinities([3], 2) == "4"
    assert intra_op_affinities([0, 1, 2], 1) == ""  # no pool
    assert intra_op_affinities(None, 4) == "" and intra_op_affinities([], 4) == ""


def _threads() -> dict:
    """This process's threads: id -> the cores it may run on, as /proc writes them."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # ended meanwhile
            continue
        out[task.name] = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                              if line.startswith("Cpus_allowed_list"))
    return out


def test_the_sessions_pool_threads_run_on_the_cores_given(tiny_build: Path):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2 or not Path("/proc/self/task").is_dir():
        pytest.skip(f"needs 2 cores or more and Linux's /proc (this machine: {len(cores) or 'unknown'} cores)")
    for given in (cores[:2], cores[1:2]):
        before = set(_threads())
        backend = open_backend(tiny_build, ["embed", "decoder"], "onnxruntime", threads=2, cores=given)
        try:
            ids = np.ones((1, 4), np.int64)
            backend.run("embed", {"input_ids": ids}, "prefill")  # the pool works
            started = {tid: allowed for tid, allowed in _threads().items() if tid not in before}
            want = str(given[1] if len(given) > 1 else given[0])  # a pool thread a session, the core after the first
            assert backend.affinities == str(int(want) + 1)
            assert started and set(started.values()) == {want}, started
        finally:
            backend.close()
    plain = open_backend(tiny_build, ["embed"], "onnxruntime", threads=2)  # no cores: none placed
    try:
        assert plain.affinities == ""
    finally:
        plain.close()
