"""API keys, the bounded queue, clients that leave, SIGTERM, and the environment's overrides."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import BACKEND, running_server

MODEL = "autoglm-phone-9b"
CHAT = "/v1/chat/completions"
KEY = "s3cret-key"


def _long_stream_body(max_tokens=1800):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True, "temperature": 1.0, "seed": 1, "ignore_eos": True}


@pytest.fixture(scope="module")
def strict_server(served_build: Path, tmp_path_factory):
    """One batch row, one waiting slot, an API key from the environment."""
    with running_server(served_build, tmp_path_factory.mktemp("strict"), "--max-batch", "1", "--queue-size", "1",
                        env={"AUTOGLM_BUILD_API_KEY": KEY}) as srv:
        yield srv


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key_required_when_set(strict_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
        resp = httpx.post(strict_server.url + CHAT, json=body, headers=headers, timeout=30)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(strict_server.url + "/v1/models").status_code == 401
    assert httpx.get(strict_server.url + "/health").status_code == 200  # liveness needs no key
    assert httpx.post(strict_server.url + CHAT, json=body, headers=_auth(), timeout=30).status_code == 200


def _first_event(lines) -> dict:
    """The first SSE event; ``lines`` stays open (closing the iterator would close the stream)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("stream ended")


def _stats(server) -> dict:
    return httpx.get(server.url + "/ready").json()


def _wait(server, **want):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = _stats(server)
        if all(stats[k] == v for k, v in want.items()):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"server stats {_stats(server)} never reached {want}")


def test_ready_states_the_kv_cache_s_own_dtype_and_what_a_token_takes(server):
    """``/ready`` says the cache's element type (the decoder's ``past_*``: FP32 on ONNX Runtime's FP32 graph, FP16 on
    the engines) and the bytes one token's keys and values take in it; the load benchmark's capacity line reads
    both, through its own phase's summary."""
    import asyncio
    import sys

    import numpy as np

    from autoglm_build.config import load_config
    from autoglm_build.runtime.kv_cache import CacheSpec
    from tests.conftest import ROOT, TINY

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from serve_load import capacity_line, phase
    finally:
        sys.path.pop(0)
    stats = asyncio.run(phase(server.url, 1, 2, 60))  # one stream of 2 tokens: the summary the benchmark prints from
    assert stats["errors"] == 0, stats["first_error"]
    cfg = load_config(TINY)
    want = "float16" if _stats(server)["backend"] == "tensorrt" else "float32"
    assert stats["kv_dtype"] == want
    assert stats["kv_bytes_per_token"] == CacheSpec.of(cfg.text).bytes(1, np.dtype(want).itemsize)
    mib = stats["max_batch"] * stats["context"] * stats["kv_bytes_per_token"] / 2**20
    assert f"= {mib:,.0f} MiB of {'FP16' if want == 'float16' else 'FP32'} keys/values" in capacity_line(cfg, stats)


def test_queue_full_is_429_and_a_client_that_leaves_frees_its_slot(strict_server):
    url = strict_server.url + CHAT
    with httpx.Client(timeout=60, headers=_auth()) as a, httpx.Client(timeout=60, headers=_auth()) as b:
        with a.stream("POST", url, json=_long_stream_body()) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()
            _first_event(first_lines)
            _wait(strict_server, active=1)
            with b.stream("POST", url, json=_long_stream_body()) as second:
                assert second.status_code == 200
                second_lines = second.iter_lines()
                assert _first_event(second_lines)["choices"][0]["delta"]["role"] == "assistant"
                _wait(strict_server, waiting=1)
                full = httpx.post(url, json=_long_stream_body(), headers=_auth(), timeout=30)
                assert full.status_code == 429
                assert full.headers["retry-after"] == "1"
                assert full.json()["error"]["type"] == "rate_limit_error"
            # the waiting client left: its request never takes a row
        # the generating client left mid-stream: its row is freed
        _wait(strict_server, active=0, waiting=0)
    quick = httpx.post(url, json={**_long_stream_body(3), "stream": False}, headers=_auth(), timeout=30)
    assert quick.status_code == 200


def test_sigterm_finishes_inflight_streams_then_exits(served_build: Path, tmp_path: Path):
    with running_server(served_build, tmp_path) as srv:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", srv.url + CHAT, json=_long_stream_body(1200)) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
                srv.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)


def test_a_port_in_use_is_one_line_exit_2(served_build: Path):
    import socket
    import subprocess
    import sys

    from tests.serve.conftest import BACKEND, TINY

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "autoglm_build", "serve", "-c", str(TINY), "-w", str(served_build),
                               "--backend", BACKEND, "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # uvicorn's own bind failure exits 3, this tool's accuracy code
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"]
    assert "Traceback" not in proc.stderr and "INFO:" not in proc.stderr


def test_overlap_env_overrides_the_config_and_a_bad_value_is_one_line(monkeypatch, tiny_cfg):
    from autoglm_build.errors import UserError
    from autoglm_build.serve.server import OVERLAP_ENV, decode_overlap

    assert tiny_cfg.serve.overlap is True
    for raw, want in (("", True), ("0", False), (" 1 ", True)):
        monkeypatch.setenv(OVERLAP_ENV, raw)
        assert decode_overlap(tiny_cfg) is want
    monkeypatch.setenv(OVERLAP_ENV, "off")
    with pytest.raises(UserError, match="AUTOGLM_BUILD_OVERLAP: 'off' is not 1"):
        decode_overlap(tiny_cfg)


def test_cuda_graphs_env_overrides_the_config_and_a_bad_value_is_one_line(monkeypatch, tiny_cfg):
    from autoglm_build.errors import UserError
    from autoglm_build.serve.server import CUDA_GRAPHS_ENV, cuda_graphs

    assert tiny_cfg.serve.cuda_graphs is True  # on since the GPU ran it (docs/benchmarks.md, sixth session)
    for raw, want in (("", True), ("1", True), (" 0 ", False)):
        monkeypatch.setenv(CUDA_GRAPHS_ENV, raw)
        assert cuda_graphs(tiny_cfg) is want
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "yes")
    with pytest.raises(UserError, match="AUTOGLM_BUILD_CUDA_GRAPHS: 'yes' is not 1 .on. or 0 .off.") as err:
        cuda_graphs(tiny_cfg)
    assert "serve.cuda_graphs (true)" in err.value.hint


def test_cpu_split_keeps_the_last_core_for_http_and_a_bad_override_is_one_line(monkeypatch, tiny_cfg):
    """``serve.cpu_affinity``: the scheduler on every core the process may use but the last, the event loop on the
    last; nothing where TensorRT serves, where one core is all there is, or where it is off."""
    import os

    from autoglm_build.errors import UserError
    from autoglm_build.serve.server import CPU_AFFINITY_ENV, cpu_split

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 3, 7}, raising=False)
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cpus: None, raising=False)
    assert tiny_cfg.serve.cpu_affinity is True
    assert cpu_split(tiny_cfg, "onnxruntime") == (frozenset({2, 3, 5}), frozenset({7}))
    assert cpu_split(tiny_cfg, "tensorrt") is None
    monkeypatch.setenv(CPU_AFFINITY_ENV, "0")
    assert cpu_split(tiny_cfg, "onnxruntime") is None
    monkeypatch.setenv(CPU_AFFINITY_ENV, "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4}, raising=False)
    assert cpu_split(tiny_cfg, "onnxruntime") is None
    monkeypatch.setenv(CPU_AFFINITY_ENV, "maybe")
    with pytest.raises(UserError, match="AUTOGLM_BUILD_CPU_AFFINITY: 'maybe' is not 1 .on. or 0 .off."):
        cpu_split(tiny_cfg, "onnxruntime")


@pytest.mark.skipif(BACKEND != "onnxruntime", reason="serve.cpu_affinity pins threads on the CPU backend only")
def test_the_cpu_server_and_its_benchmark_place_the_intra_op_pool_on_the_scheduler_s_cores(
        random_tiny_build: Path, tmp_path: Path, monkeypatch):
    """With a pool (``serve.cpu_threads: 2``), the server's backend (``build_state``) and the load benchmark's engine
    alone (``serve_load.open_engine``) place it on the scheduler's cores, ``cpu_split``'s first part; with
    ``serve.cpu_affinity`` off, nowhere."""
    import os
    import sys
    from types import SimpleNamespace

    from autoglm_build.config import load_config
    from autoglm_build.runtime.backends import intra_op_affinities
    from autoglm_build.serve.server import CPU_AFFINITY_ENV, build_state, cpu_split
    from tests.conftest import ROOT, write_config

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip(f"needs 2 cores or more (this machine: {len(cores) or 'unknown'})")
    cfg = load_config(write_config(tmp_path / "pool.yaml", {"serve": {"cpu_threads": 2}}))
    want = intra_op_affinities(cpu_split(cfg, "onnxruntime")[0], 2)
    assert want == str(cores[0] + 1 if len(cores) == 2 else cores[1] + 1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from serve_load import open_engine
    finally:
        sys.path.pop(0)
    for affinity, expect in (("1", want), ("0", "")):
        monkeypatch.setenv(CPU_AFFINITY_ENV, affinity)
        state = build_state(cfg, random_tiny_build, backend="onnxruntime")
        try:
            assert state.backend.affinities == expect
            assert (state.cpus is None) == (not expect)
        finally:
            state.backend.close()
        engine = open_engine(SimpleNamespace(workdir=str(random_tiny_build), backend="onnxruntime"), cfg)
        try:
            assert engine.affinities == expect
        finally:
            engine.close()


def _allowed(pid: int, tid: int) -> str:
    """The cores the thread may run on, as /proc writes them (``0-2,5``); '' for a thread that has ended."""
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except OSError:
        return ""
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


@pytest.mark.skipif(BACKEND != "onnxruntime", reason="serve.cpu_affinity pins threads on the CPU backend only")
def test_the_cpu_server_runs_its_scheduler_and_its_event_loop_on_cores_of_their_own(served_build: Path, tmp_path):
    """``serve.cpu_affinity`` as the OS sees it: the server process's main thread (uvicorn's event loop) may run on
    the last core only, one thread (the scheduler's) on the others only; the announce line says so."""
    import os

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2 or not Path("/proc/self/task").is_dir():
        pytest.skip(f"needs 2 cores or more and Linux's /proc (this machine: {len(cores) or 'unknown'} cores)")
    with running_server(served_build, tmp_path) as srv:
        pid = srv.proc.pid
        allowed = {int(t.name): _allowed(pid, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}
        assert allowed[pid] == str(cores[-1])  # the main thread: uvicorn's event loop
        # the scheduler's thread alone on the others (threads started before it keep every core, those the loop
        # starts after it take the loop's)
        assert list(allowed.values()).count(_ranges(cores[:-1])) == 1, allowed
        assert f"scheduler on CPU {','.join(map(str, cores[:-1]))}, HTTP on CPU {cores[-1]}" in srv.log.read_text()


def _ranges(cores) -> str:
    """``[0, 1, 2, 5]`` as /proc lists it: ``0-2,5``."""
    out, start = [], None
    for k, core in enumerate(cores):
        if start is None:
            start = core
        if k + 1 == len(cores) or cores[k + 1] != core + 1:
            out.append(str(start) if start == core else f"{start}-{core}")
            start = None
    return ",".join(out)
