"""The opened build: paths stay inside the workdir (issue 16, item 1), temps of killed runs are
cleaned (item 5), files are checked against their records (item 2)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.manifest import Manifest
from tests.conftest import write_config

runner = CliRunner()


def _strict_audio(tmp_path, trust_config):
    """A config whose audio export fails its accuracy check: a failing rerun (exit 3), which removes
    the stage's earlier outputs."""
    return write_config(tmp_path / "strict.yaml", {"export": {"tolerances": {"audio": {"atol": 0, "rtol": 0}}}},
                        base=trust_config)


def _add_recorded_path(workdir, rel):
    """Record ``rel`` as one more output of export/audio, as a hostile manifest would."""
    data = json.loads((workdir / "manifest.json").read_text())
    art = dict(data["artifacts"]["onnx/audio.onnx"], path=rel)
    data["artifacts"][rel] = art
    data["records"]["export/audio"]["artifacts"].append(rel)
    (workdir / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_a_recorded_path_outside_the_workdir_is_refused_and_never_deleted(trust_copy, trust_config, tmp_path, where):
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    _add_recorded_path(trust_copy, "../victim" if where == "dotdot" else str(victim))
    result = runner.invoke(app, ["export", "--force", "-c", _strict_audio(tmp_path, trust_config),
                                 "-w", trust_copy, "-m", "audio"])
    assert victim.read_text() == "not yours\n"
    assert result.exit_code == 2, result.output
    assert "manifest.json: artifact record export/audio: path" in result.stderr


def test_a_symlinked_artifact_directory_is_refused_and_its_target_kept(trust_copy, trust_config, tmp_path):
    outside = tmp_path / "outside-onnx"
    shutil.move(str(trust_copy / "onnx"), str(outside))
    (trust_copy / "onnx").symlink_to(outside)  # the recorded bytes still match, through the link
    result = runner.invoke(app, ["export", "--force", "-c", _strict_audio(tmp_path, trust_config),
                                 "-w", trust_copy, "-m", "audio"])
    assert (outside / "audio.onnx").is_file()
    assert result.exit_code == 2, result.output
    assert "manifest record export/audio ('onnx/audio.onnx')" in result.stderr and "outside" in result.stderr


def test_check_refuses_a_symlink_out_and_a_substituted_file(trust_copy, tmp_path):
    from autoglm_build.paths import IntegrityError
    from autoglm_build.workdir import Build

    build = Build(trust_copy)
    art = build.artifact("optimize", "audio", "onnx")
    assert build.check(art) == trust_copy / "optimized" / "audio.onnx"
    outside = tmp_path / "audio.onnx"
    shutil.move(str(trust_copy / art.path), str(outside))
    (trust_copy / art.path).symlink_to(outside)
    with pytest.raises(IntegrityError, match="outside"):
        build.check(art)
    (trust_copy / art.path).unlink()
    shutil.copyfile(trust_copy / "optimized" / "embed.onnx", trust_copy / art.path)
    with pytest.raises(IntegrityError, match=r"bytes differ from its manifest record.*rebuild with --force"):
        build.check(art)


KILLED = [".export-audio-x1y2/raw/audio.onnx", ".calibrate-int8-audio-abc/q.onnx", ".samples-embed-zz/embed.npz",
          ".optimize-embed-q/embed.onnx", ".manifest.json.k3j4.tmp", "engines/.audio.fp16.engine.9f8e"]
KEPT = ["notes.txt", ".gitignore", "onnx/audio.onnx", "engines/audio.fp16.engine.bak"]


def _leave_temps(workdir):
    for rel in KILLED + KEPT:
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"left by a killed run")


def test_the_next_run_removes_the_temps_of_killed_runs(trust_copy, trust_config):
    _leave_temps(trust_copy)
    result = runner.invoke(app, ["export", "-c", trust_config, "-w", trust_copy, "-m", "embed"])
    assert result.exit_code == 0, result.output
    assert [rel for rel in KILLED if (trust_copy / rel).exists()] == []
    assert [rel for rel in KILLED if rel.startswith(".") and (trust_copy / rel.split("/")[0]).exists()] == []
    assert all((trust_copy / rel).exists() for rel in KEPT)


def test_temps_of_a_run_still_building_are_kept(trust_copy, trust_config):
    _leave_temps(trust_copy)
    fd = os.open(trust_copy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another run building in this workdir right now
        result = runner.invoke(app, ["export", "-c", trust_config, "-w", trust_copy, "-m", "embed"])
    finally:
        os.close(fd)
    assert result.exit_code == 0, result.output
    assert all((trust_copy / rel).exists() for rel in KILLED + KEPT)


def test_manifest_is_written_with_the_mode_of_other_artifacts(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "a.onnx").write_bytes(b"x")
        Manifest(config_name="tiny").save(tmp_path)
    finally:
        os.umask(old)
    mode = (tmp_path / "manifest.json").stat().st_mode & 0o777
    assert mode == 0o644 == (tmp_path / "a.onnx").stat().st_mode & 0o777


@pytest.mark.parametrize("command", ["optimize", "calibrate"])
def test_a_command_refused_on_a_new_workdir_leaves_no_directory(tmp_path, command):
    parent = tmp_path / "builds"  # neither it nor the workdir exists yet
    result = runner.invoke(app, [command, "-c", str(write_config(tmp_path / "c.yaml", {})), "-w",
                                 str(parent / "nested" / "w"), "-m", "embed"])
    assert result.exit_code == 2, result.output
    assert "export" in result.stderr  # no exported graph yet: run export first
    assert not parent.exists()


def test_a_new_workdir_shared_with_another_run_is_kept(tmp_path):
    from autoglm_build.workdir import BuildSession

    first, second = BuildSession(tmp_path / "w"), BuildSession(tmp_path / "w")
    first.ensure()
    second.ensure()  # another run holds it too: the one that created it must not remove it
    first.close()
    assert (tmp_path / "w").is_dir()
    second.close()
    assert (tmp_path / "w").is_dir()  # the second did not create it
