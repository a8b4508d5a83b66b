"""The TensorRT backend's device-resident KV cache (issue 14) under the fake TensorRT (tests/engine/fake_trt),
whose CUDA runtime is host memory and counts every copy by kind.

Served greedy generations (``tests.runtime.device_scenario``: text prompts alone, eight together, two at a
time with rows joining and leaving, and phone-agent steps that hit the prefix cache, screenshots included)
equal ONNX Runtime's on the same FP16 graphs token for token, while per decode step only the ids, the
positions, one mask element per row (the whole mask after a re-lay) go up and the used rows' logits come
back: never the cache. The same checks on the path before the device cache (the host cache through
Polygraphy's ``infer``) fail, which ``test_the_checks_fail_on_the_host_cache`` shows.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from tests.conftest import TINY
from tests.engine.fake_trt import harness

pytestmark = pytest.mark.slow
PAIRS = [("8.5.3", "0.49.26"), ("10.13.0", "0.53.6")]  # the GPU harness's pair, and a current one
MODULES = ["-m", "vision", "-m", "embed", "-m", "decoder"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """The tiny config's vision, embed and decoder graphs (every CPU stage) and samples."""
    workdir = tmp_path_factory.mktemp("device-cache") / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_TRT")}
    out = harness.run(["-m", "autoglm_build", "run", "-c", str(TINY), "-w", str(workdir), *MODULES, "-q"], env,
                      timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _engines(graphs: Path, tmp_path: Path, trt: str, polygraphy: str):
    workdir = tmp_path / "w"
    shutil.copytree(graphs, workdir)
    env = harness.environment(trt, polygraphy, tmp_path / "calls.jsonl")
    built = harness.run(["-m", "autoglm_build", "engine", "-w", str(workdir), *MODULES, "--precision", "fp16"], env,
                        timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return workdir, env


def _drive(workdir: Path, env: Dict[str, str], *mode: str) -> Dict[str, Any]:
    script = str(Path(harness.__file__).with_name("drive_serve.py"))
    out = harness.run([script, str(workdir), "fp16", *mode], env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def traffic_problems(steps: List[Dict[str, Any]], counted: str = "fake") -> List[str]:
    """What each decode step moved beyond the device cache's budget: device to host at most the logits of
    the rows it ran (``rows x vocab`` FP32), host to device at most the ids, positions and mask elements
    (8 bytes each, 5 per row) and one upload of the whole mask (after a re-lay), and never as much as
    the cache the step read (``cache_bytes``: ``top`` rows at the capacity)."""
    problems = []
    for i, step in enumerate(steps):
        moved = step[counted]
        h2d, d2h = (moved.get(k, moved.get(f"{k}_bytes")) for k in ("h2d", "d2h"))
        mask = step["slots"] * (step["capacity"] + 1) * 8
        if d2h > step["logits_bytes"]:
            problems.append(f"step {i}: {d2h} bytes to the host, over the logits' {step['logits_bytes']}")
        if h2d > 5 * 8 * step["rows"] + mask or max(h2d, d2h) >= step["cache_bytes"]:
            problems.append(f"step {i}: {h2d} bytes to the device, {d2h} back; the cache is {step['cache_bytes']}")
    return problems


@pytest.mark.parametrize("trt, polygraphy", PAIRS)
def test_served_greedy_on_the_device_cache_equals_onnx_runtime_and_the_cache_stays_on_the_gpu(graphs, tmp_path, trt,
                                                                                                 polygraphy):
    workdir, env = _engines(graphs, tmp_path, trt, polygraphy)
    result = _drive(workdir, env)
    on_trt, on_ort = result["tensorrt"], result["onnxruntime"]
    assert on_trt["cache"] == "DeviceKVCache" and on_ort["cache"] == "OrtKVCache"
    assert on_trt["screens_on_device"] == ["DeviceEmbeds", "DeviceEmbeds"]  # the vision engine's output stays
    # the decoder's prefill and decode contexts share one activation scratch (one profile's engines: none);
    # the fake fails a context made without device memory that runs without any
    assert on_trt["describe"]["shared_scratch_bytes"] == {"decoder": 1 << 20}
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert on_trt[case] == on_ort[case], case
    assert on_trt["batched"] == on_trt["joining"] == on_trt["solo"]
    assert on_trt["agent"] == on_trt["agent_alone"]  # prefix reuse generates what a whole prefill does
    assert on_trt["prefix"]["hits"] == 2 and on_trt["prefix"]["tokens_reused"] >= 2 * 1024
    assert on_trt["prefix"] == on_ort["prefix"]
    steps = [s for case in on_trt["steps"].values() for s in case]
    assert len(steps) >= 40 and max(s["top"] for s in steps) == len(on_trt["solo"])
    assert traffic_problems(steps) == []
    alone = [s["alone_max_diff"] for s in steps if "alone_max_diff" in s]  # a row alone in a slot above 0
    assert len(alone) >= 5 and max(alone) < 1e-3, alone
    for step in steps:
        assert step["device"]["h2d_bytes"] == step["fake"]["h2d"]  # the cache's own count is the runtime's
        assert step["device"]["d2h_bytes"] == step["fake"]["d2h"] and step["device"]["d2h_calls"] >= 1
    for case in on_trt["steps"].values():  # contexts bound once per (rows, capacity), not per step
        for before, step in zip(case, case[1:]):
            same = (step["top"], step["capacity"]) == (before["top"], before["capacity"])
            if same and not step["after_prefill"] and not step["probed"]:
                assert step["rebinds"] == 0, step


@pytest.mark.parametrize("select", [False, True], ids=["host-sampler", "device-select"])
def test_the_decode_overlap_on_the_device_cache_generates_what_the_serial_scheduler_does(graphs, tmp_path, select):
    """Issue 14: with ``serve.overlap`` the scheduler launches each decode step (``decode_async``: the engines,
    the new columns' copies and the mask queued; the logits downloaded when the result is taken) before the
    previous step's text work; with the select engine (``device-select``) it launches each step on the ids the
    step in flight leaves on the GPU (``decode_ahead``), before it takes them. ``tests.runtime.overlap_scenario``'s
    cases (rows joining and leaving, greedy and seeded sampling with penalties, a thinking span closed by its budget,
    stop strings ending rows while a step is in flight, a cancel, prefix reuse) give every event the serial
    scheduler gives, none an error; the cache refuses every call that changes it while a step is in flight; a
    result whose download raises (the logits, or the ids with the next step launched on them: both taken back, the
    rows' generators put back, so sampled rows keep their tokens), a launch that raises halfway through its rows'
    commits, or (select) one whose noise upload raises after the rows' streams gave their numbers, is taken back
    (lengths, mask, the streams) and run again serially."""
    workdir, env = _engines(graphs, tmp_path, *PAIRS[0])
    cases = _drive(workdir, env, "overlap", *(["select"] if select else []))["tensorrt"]
    failing = cases.pop("failing_results")
    for name, case in cases.items():
        on, off = case["on"], case["off"]
        assert on["cache"] == off["cache"] == "DeviceKVCache"
        assert on["selecting"] == off["selecting"] == select, name
        assert on["events"] == off["events"] and on["tokens"] == off["tokens"], name
        assert not [e for events in on["events"] for e in events if e["type"] == "error"], name
        assert off["overlapped_steps"] == 0 and on["overlapped_steps"] >= on["decode_steps"] // 2, name
        assert on["stopped_in_flight"] >= 1, name
        assert on["refused"] == ["decode", "decode_async", "release", "move", "fit", "save_block", "prefill"]
    assert cases["agent"]["on"]["prefix"]["hits"] == 2
    assert failing["on"]["events"] == failing["off"]["events"]
    assert not [e for events in failing["on"]["events"] for e in events if e["type"] == "error"]
    assert failing["failed"] == 2 and failing["launch_failed"] == 1 and failing["wrong_lengths"] == 0
    assert failing["noise_failed"] == (1 if select else 0)  # a noise upload that raised: the same tokens after it


@pytest.mark.parametrize("trt, polygraphy", PAIRS)
def test_decode_steps_as_cuda_graphs_generate_what_the_engine_by_engine_steps_do(graphs, tmp_path, trt, polygraphy):
    """``serve.cuda_graphs``: each binding's decode steps run once engine by engine, are captured the next step
    (TensorRT 8.5: the first enqueue after a shape change is not capturable; the fake fails such a capture,
    a copy or a wait inside one) and launched from then on, replaying the captured shapes and addresses.
    Every case generates the tokens it does without graphs, the per-step traffic stays the cache's budget,
    and a re-binding (rows joining, a prefill on the shared embed context) makes a new graph, never a stale
    one replayed."""
    workdir, env = _engines(graphs, tmp_path, trt, polygraphy)
    result = _drive(workdir, env, "graphs")
    on, off = result["graphs"], result["plain"]
    assert result["fake"]["violations"] == []
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert on[case] == off[case], case
    counts = on["graphs"]
    assert off["graphs"] is None and counts["refused"] == 0
    assert counts["captures"] >= 10 and counts["launches"] >= 3 * counts["captures"], counts
    assert result["fake"]["launches"] == counts["launches"]
    steps = [s for case in on["steps"].values() for s in case]
    assert traffic_problems(steps) == []
    # a runtime that refuses every capture: the same tokens engine by engine, each cache's graphs off after
    # StepGraphs.MAX_FAILURES refusals in a row, nothing launched
    refused = result["refused"]
    assert refused["solo"] == off["solo"] and refused["joining"] == off["joining"]
    assert refused["graphs"]["captures"] == refused["graphs"]["launches"] == 0
    assert refused["graphs"]["refused"] >= 3 and refused["graphs"]["off"] >= 1, refused["graphs"]
    assert result["fake"]["violations_after_refusals"] == []


@pytest.mark.parametrize("trt, polygraphy", PAIRS)
def test_tokens_chosen_on_the_gpu_are_the_host_samplers_and_only_their_ids_come_back(graphs, tmp_path, trt,
                                                                                      polygraphy):
    """``serve.device_select``: the select engine (built by the server from ``runtime/select.py``'s graph, run right
    after the decoder) chooses every decode step's tokens on the GPU, into the ids the next step's embed engine
    reads; the scheduler launches that step before it takes this one's ids. Greedy rows with the phone agent's
    frequency penalty (solo, eight together, joining and leaving, agent steps with prefix reuse and screenshots)
    get the host sampler's tokens, with CUDA graphs and without; seeded sampled rows get the same tokens alone and
    eight together, other than the host sampler's draws (so the GPU drew them); two schedulers sharing the backend's
    select engine in turn each get their own tokens; rows that run to the context's last column get every token with
    no launch ahead failing past it; where the engine does not build, the host samples. Per decode step, from its
    launch to its result, no more than the ids of its rows and of the step launched within it come back (4 bytes a
    row), never a row of logits, and the fake runtime saw no unordered use of memory across streams."""
    workdir, env = _engines(graphs, tmp_path, trt, polygraphy)
    result = _drive(workdir, env, "select")
    on, graphed, host = result["select"], result["select_graphs"], result["host"]
    assert all(on["selecting"]) and all(graphed["selecting"]) and not any(host["selecting"])
    for case in ("solo", "batched", "joining", "agent_alone", "agent"):
        assert on[case] == host[case] == graphed[case], case
    assert on["sampled"] == on["sampled_solo"] == graphed["sampled"] == graphed["sampled_solo"]
    assert on["sampled"] != host["sampled"] and host["sampled"] == host["sampled_solo"]
    assert on["prefix"]["hits"] == 2
    assert on["ahead"] >= 40 and graphed["graphs"]["launches"] >= 40 and graphed["graphs"]["refused"] == 0
    # two schedulers on one backend in turn (each cache's tables bound to the shared select engine anew)
    assert on["shared"][0] == on["shared"][1] == on["shared"][2] == on["batched"][:3]
    # rows that end at the cache's last column: no step is launched ahead past it (none failed), yet some were
    limit = on["limit"]
    assert limit["generated"] == limit["wanted"] and limit["fallbacks"] == 0 and limit["ahead"] >= 10, limit
    # where the engine does not build, the scheduler samples on the host: the host's tokens
    assert not any(result["unbuilt"]["selecting"]) and result["unbuilt"]["solo"] == host["solo"]
    steps = [s for run in (on, graphed) for case in run["steps"].values() for s in case]
    assert len(steps) >= 100
    for step in steps:
        ids = step["top"] * 4  # int32 (8.5) or int64 (10): at most 8 bytes a row, both steps' ids in a window
        assert step["fake_largest"]["d2h"] <= 2 * ids and step["fake"]["d2h"] <= 4 * ids, step
        assert step["fake"]["h2d"] < step["cache_bytes"] + 4 * step["top"] * 4096 * 4, step  # a joining row's tables
    assert result["fake"]["violations"] == []


def test_the_checks_fail_on_the_host_cache(graphs, tmp_path):
    """The path before the device cache (host arrays through Polygraphy's ``infer``) generates the same
    tokens and moves the whole cache both ways every step: each step fails the traffic check."""
    workdir, env = _engines(graphs, tmp_path, *PAIRS[0])
    on_trt = _drive(workdir, env, "host")["tensorrt"]
    assert on_trt["cache"] == "KVCache" and on_trt["screens_on_device"] == ["DeviceEmbeds", "DeviceEmbeds"]
    steps = [s for case in on_trt["steps"].values() for s in case]
    assert len(traffic_problems(steps)) >= len(steps)
    assert all(s["fake"]["d2h"] >= s["cache_bytes"] for s in steps)


def test_a_3d_copy_moves_the_columns_numpy_would(tmp_path):
    """``Device.columns`` (one ``cudaMemcpy3DAsync``) against numpy slicing, on the fake runtime, between
    layouts whose planes are padded to start 256-byte aligned (7 columns of 10 bytes: 128 lines a plane)."""
    script = textwrap.dedent("""
        import numpy as np
        from autoglm_build.runtime.device import Device, Layout

        def padded(layout, values):  # (planes, rows, heads, columns, dim) -> the layout's bytes
            out = np.zeros((layout.planes, layout.lines, layout.columns, 5), np.float16)
            out[:, :layout.rows * layout.heads] = values.reshape(layout.planes, -1, layout.columns, 5)
            return out

        d = Device()
        rng = np.random.default_rng(0)
        src = rng.standard_normal((3, 4, 2, 9, 5)).astype(np.float16)  # planes, rows, heads, columns, dim
        dst = np.zeros((3, 6, 2, 7, 5), np.float16)
        a, b = Layout(d.malloc(1 << 16), 3, 4, 2, 9, 10), Layout(d.malloc(1 << 16), 3, 6, 2, 7, 10)
        assert b.lines == 128 and b.plane_bytes % 256 == 0 and a.nbytes < 1 << 16 and b.nbytes < 1 << 16
        d.upload(a.ptr, padded(a, src))
        d.upload(b.ptr, padded(b, dst))
        d.columns(b, 3, 2, a, 1, 4, 5, rows=2)
        dst[:, 3:5, :, 2:7] = src[:, 1:3, :, 4:9]
        got = np.empty((3, b.lines, 7, 5), np.float16)
        d.download(got, b.ptr)
        d.sync()
        assert (got == padded(b, dst)).all()
        assert d.traffic["d2d_bytes"] == 3 * 2 * 2 * 5 * 10 and d.traffic["d2d_calls"] == 1
        print("ok")
    """)
    out = harness.run(["-c", script], harness.environment(*PAIRS[0], tmp_path / "calls.jsonl"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_device_embeds_index_a_row_without_copying_and_free_once(tmp_path):
    """``audio_embeds[0]`` on the GPU: a view into the encoder's buffer (same bytes, kept alive by the
    view), copied to the host only when asked; the buffer is freed once, with its owner."""
    script = textwrap.dedent("""
        import gc
        import numpy as np
        from autoglm_build.runtime.device import Device, DeviceEmbeds
        d = Device()
        host = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
        ptr = d.malloc(host.nbytes)
        d.upload(ptr, host)
        whole = DeviceEmbeds(d, ptr, host.shape, np.float32)
        row = whole[1]
        del whole
        gc.collect()
        assert len(row) == 3 and row.ptr == ptr + 3 * 4 * 4 and (np.asarray(row) == host[1]).all()
        handle = d.cuda.handle
        assert ptr in handle.buffers
        del row
        gc.collect()
        assert ptr not in handle.buffers
        print("ok")
    """)
    out = harness.run(["-c", script], harness.environment(*PAIRS[0], tmp_path / "calls.jsonl"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_rows_whose_new_columns_share_a_column_commit_in_one_copy():
    """``column_runs``: consecutive used rows with equal lengths are one run; a gap in the rows or another length
    starts the next."""
    from autoglm_build.runtime.device_cache import column_runs

    lengths = np.array([7, 7, 7, 9, 9, 0, 7, 7])
    assert column_runs([0, 1, 2, 3, 4, 6, 7], lengths) == [(0, 3, 7), (3, 2, 9), (6, 2, 7)]
    assert column_runs([0, 2], lengths) == [(0, 1, 7), (2, 1, 7)]
    assert column_runs([], lengths) == []
