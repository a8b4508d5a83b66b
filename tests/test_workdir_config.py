"""A workdir carries its config (issue 17): commands without -c use it, a -c from another file that
disagrees is refused naming both files, CLI settings stick, data paths follow the config file, and
--dry-run predicts what run does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.manifest import Manifest
from tests.conftest import ROOT, TINY, write_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _second_build(tmp_path: Path):
    """A build of a second config (its own name, seed and modules) in its own workdir."""
    config = write_config(tmp_path / "second.yaml", {"name": "second", "seed": 1, "modules": ["embed"]})
    workdir = tmp_path / "second-build"
    result = invoke("export", "-c", config, "-w", workdir)
    assert result.exit_code == 0, result.output
    return config, workdir


def test_run_on_a_second_configs_workdir_without_c_uses_its_config(tmp_path):
    config, workdir = _second_build(tmp_path)
    plan = json.loads(invoke("run", "-w", workdir, "--dry-run", "--json").stdout)
    assert plan["config"] == "second" and plan["config_path"] == str(config.resolve())
    assert [m["module"] for m in plan["modules"]] == ["embed"]
    assert next(s for s in plan["stages"] if s["stage"] == "export")["cached"]
    result = invoke("export", "-w", workdir, "-m", "embed", "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["outcomes"]] == ["cached"]
    manifest = Manifest.load(workdir)
    assert manifest.config_name == "second" and manifest.config["seed"] == 1


def test_serve_on_a_second_configs_workdir_without_c_uses_its_config(tmp_path, monkeypatch):
    import autoglm_build.serve.server as server

    _, workdir = _second_build(tmp_path)
    seen = {}
    monkeypatch.setattr(server, "build_state", lambda cfg, target, *args: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(server, "serve", lambda state, host, port, *args, **kwargs: seen.update(port=port))
    result = invoke("serve", "-w", workdir)
    assert result.exit_code == 0, result.output
    assert seen["cfg"].name == "second" and seen["cfg"].modules == ["embed"] and seen["cfg"].seed == 1


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_conflicting_c_exits_2_naming_both_files_and_force_rebuilds(tmp_path):
    config, workdir = _second_build(tmp_path)
    before = _tree(workdir)
    for args in (["export", "-m", "embed"], ["run", "--dry-run"], ["verify"], ["bench", "--backends", "ort"],
                 ["serve"]):
        result = invoke(*args, "-c", TINY, "-w", workdir)
        assert result.exit_code == 2, (args, result.output)
        error = result.stderr.strip().splitlines()[0]
        assert error.startswith("error: ") and str(TINY) in error and str(config.resolve()) in error, error
        assert "seed" in error and "Traceback" not in result.output
    assert _tree(workdir) == before
    result = invoke("export", "-c", TINY, "-w", workdir, "-m", "embed", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["outcomes"]] == ["ran"]
    manifest = Manifest.load(workdir)
    assert manifest.config_name == "autoglm-phone-tiny" and manifest.config_path == str(TINY)


def test_editing_the_workdirs_own_config_file_is_no_conflict(tmp_path):
    config, workdir = _second_build(tmp_path)
    write_config(config, {"name": "second", "seed": 2, "modules": ["embed"]})
    result = invoke("export", "-c", config, "-w", workdir, "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["outcomes"]] == ["ran"]
    assert "changed since" in result.stderr and "seed" in result.stderr


def test_calibrate_target_cosine_sticks_for_the_next_run(trust_copy):
    result = invoke("calibrate", "--int8", "-w", trust_copy, "-m", "embed", "--target-cosine", "0.5")
    assert result.exit_code == 0, result.output
    outcomes = json.loads(invoke("run", "-w", trust_copy, "-m", "embed", "--json").stdout)["outcomes"]
    assert {o["stage"]: o["status"] for o in outcomes}["calibrate-int8"] == "cached"
    assert Manifest.load(trust_copy).config["calibrate"]["target_cosine"] == 0.5


def test_calibration_data_follows_the_config_file_and_is_checked_before_any_stage(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copytree(ROOT / "calibration_data", tmp_path / "calibration_data")
    data = yaml.safe_load(TINY.read_text())
    data["tokenizer"] = str(TINY.parent / data["tokenizer"])
    data["checkpoint"] = str(TINY.parent / data["checkpoint"])
    (configs / "tiny.yaml").write_text(yaml.safe_dump(data))  # keeps `data: ../calibration_data`
    from autoglm_build.config import load_config

    assert Path(load_config(configs / "tiny.yaml").calibrate.data) == (tmp_path / "calibration_data").resolve()
    data["calibrate"]["data"] = "no-such-data"
    (configs / "bad.yaml").write_text(yaml.safe_dump(data))
    workdir = tmp_path / "w"
    result = invoke("run", "-c", configs / "bad.yaml", "-w", workdir, "-m", "embed")
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[0]
    assert "calibrate.data" in error and str(configs / "no-such-data") in error
    assert not workdir.exists()  # export and optimize wrote nothing


def test_dry_run_after_a_config_change_predicts_what_run_does(trust_copy, trust_config, tmp_path):
    config = tmp_path / "c.yaml"
    shutil.copyfile(trust_config, config)
    assert invoke("export", "-c", config, "-w", trust_copy, "-m", "audio").exit_code == 0  # same content
    write_config(config, {"checkpoint": None, "audio": {"encoder_ffn_dim": 96}}, base=trust_config)  # new widths
    plan = json.loads(invoke("run", "-c", config, "-w", trust_copy, "-m", "audio", "--dry-run", "--json").stdout)
    predicted = {(s["stage"], s["module"]): not s["cached"] for s in plan["stages"]}
    outcomes = json.loads(invoke("run", "-c", config, "-w", trust_copy, "-m", "audio", "--json").stdout)["outcomes"]
    ran = {(o["stage"], o["module"]): o["status"] == "ran" for o in outcomes}
    assert predicted == ran
    assert all(ran.values())  # the export changed: everything after it reruns
    reasons = {s["stage"]: s["reason"] for s in plan["stages"]}
    assert reasons["export"] == "fingerprint changed" and reasons["optimize"] == "an input is rebuilt first"


def test_the_same_config_at_another_path_with_its_files_elsewhere_is_no_conflict(tmp_path):
    """A workdir carried to another machine: same config, repo (tokenizer, data) at another path."""
    config, workdir = _second_build(tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(ROOT / "calibration_data", moved / "calibration_data")
    data = yaml.safe_load(config.read_text())
    tokenizer = moved / "tokenizer.json"
    shutil.copyfile(data["tokenizer"], tokenizer)
    data.update(tokenizer=str(tokenizer), calibrate={**data["calibrate"], "data": str(moved / "calibration_data")})
    (moved / "second.yaml").write_text(yaml.safe_dump(data))
    result = invoke("export", "-c", moved / "second.yaml", "-w", workdir, "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["outcomes"]] == ["cached"]


def test_a_c_that_differs_only_in_the_servers_settings_takes_the_workdir_as_built(tmp_path):
    """No artifact depends on ``serve.*``: a config from another file that differs from the workdir's there only (a
    new serving option's default, another port) is taken, and nothing reruns; one more difference outside ``serve``
    is still refused."""
    config, workdir = _second_build(tmp_path)
    same = yaml.safe_load(Path(config).read_text())
    other = write_config(tmp_path / "other.yaml", {**same, "serve": {"port": 8123, "device_select": False}})
    result = invoke("export", "-c", other, "-w", workdir, "-m", "embed", "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["outcomes"]] == ["cached"]
    refused = write_config(tmp_path / "refused.yaml", {**same, "seed": 5, "serve": {"port": 8123}})
    result = invoke("export", "-c", refused, "-w", workdir, "-m", "embed")
    error = result.stderr.splitlines()[0]
    assert result.exit_code == 2 and "seed" in error and "port" not in error and "device_select" not in error
