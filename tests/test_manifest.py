from __future__ import annotations

import json
import os

import pytest

from autoglm_build.errors import UserError
from autoglm_build.manifest import Manifest, StageRecord, artifact_state, make_artifact


def _record(stage="export", module="vision"):
    return StageRecord(stage=stage, module=module, status="done", fingerprint="f" * 64)


def test_round_trip_and_atomic_save(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"abc")
    m = Manifest(config_name="tiny")
    m.put(_record(), [make_artifact(tmp_path, tmp_path / "a.onnx", "onnx", "vision", "export")])
    m.save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = Manifest.load(tmp_path)
    assert loaded.artifacts["a.onnx"].bytes == 3
    assert loaded.record("export", "vision").artifacts == ["a.onnx"]
    assert loaded.intact(tmp_path, loaded.record("export", "vision"))


def test_artifact_states(tmp_path):
    path = tmp_path / "a.onnx"
    path.write_bytes(b"abc")
    art = make_artifact(tmp_path, path, "onnx", "vision", "export")
    assert artifact_state(tmp_path, art) == "ok"
    os.utime(path, ns=(art.mtime_ns + 10**9, art.mtime_ns + 10**9))  # touched, same bytes
    assert artifact_state(tmp_path, art) == "ok"
    path.write_bytes(b"abd")  # same size, new content
    assert artifact_state(tmp_path, art) == "modified"
    path.unlink()
    assert artifact_state(tmp_path, art) == "missing"


def test_rerun_replaces_previous_artifacts(tmp_path):
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(b"x")
    m = Manifest()
    m.put(_record(), [make_artifact(tmp_path, tmp_path / "a.onnx", "onnx", "vision", "export")])
    m.put(_record(), [make_artifact(tmp_path, tmp_path / "b.onnx", "onnx", "vision", "export")])
    assert list(m.artifacts) == ["b.onnx"]


def test_unreadable_or_foreign_manifest_is_a_user_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(UserError, match="schema_version: 99, this tool reads 1"):
        Manifest.load(tmp_path)


def _commit_many(workdir, module, count):
    from pathlib import Path

    m = Manifest.load(Path(workdir))  # a stale copy: the other process commits meanwhile
    for i in range(count):
        m.commit(Path(workdir), [(_record(stage=f"engine-{i}", module=module), [])])


def test_concurrent_processes_keep_each_others_records(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    modules = ("vision", "decoder", "audio", "embed")
    procs = [ctx.Process(target=_commit_many, args=(str(tmp_path), module, 40)) for module in modules]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    records = Manifest.load(tmp_path).records
    assert len(records) == 160
    assert {"engine-39/vision", "engine-39/decoder", "engine-0/vision"} <= set(records)


def test_commit_refreshes_the_in_memory_copy(tmp_path):
    a, b = Manifest(config_name="tiny"), Manifest()
    a.commit(tmp_path, [(_record(module="vision"), [])])
    b.commit(tmp_path, [(_record(module="audio"), [])])
    assert set(b.records) == {"export/vision", "export/audio"}
    assert b.config_name == "tiny"
