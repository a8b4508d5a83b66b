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
