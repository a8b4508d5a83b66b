"""The CLI through its entry point: outputs on the right streams, exit codes, nothing half-written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from tests.conftest import FULL, TINY, write_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_export_json_is_one_document_on_stdout(tiny_build_copy):
    result = invoke("export", "-c", TINY, "-w", tiny_build_copy, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {o["module"]: o["status"] for o in doc["outcomes"]} == dict.fromkeys(
        ["vision", "audio", "embed", "decoder"], "cached")
    assert "cached" in result.stderr  # logs go to stderr


def test_run_does_every_stage_then_caches_them_all(tiny_build_copy):
    first = json.loads(invoke("run", "-c", TINY, "-w", tiny_build_copy, "--json").stdout)["outcomes"]
    assert {(o["stage"], o["status"]) for o in first} == {
        ("export", "cached"), ("optimize", "ran"), ("samples", "ran"), ("calibrate-int8", "ran"),
        ("calibrate-fp16", "ran")}
    second = json.loads(invoke("run", "-c", TINY, "-w", tiny_build_copy, "--json").stdout)["outcomes"]
    assert len(second) == 20 and {o["status"] for o in second} == {"cached"}


def test_global_options_before_the_command(tiny_build_copy):
    result = invoke("-c", TINY, "-w", tiny_build_copy, "--json", "export", "-m", "embed")
    assert result.exit_code == 0
    assert [o["module"] for o in json.loads(result.stdout)["outcomes"]] == ["embed"]


def test_table_shows_validation_errors(tmp_path):
    result = invoke("export", "-c", TINY, "-w", tmp_path / "w", "-m", "embed")
    assert result.exit_code == 0
    assert "ONNX Runtime vs PyTorch" in result.stdout and "pass" in result.stdout
    assert "seq 16" in result.stdout


def test_dry_run_full_size_counts_real_parameters_and_writes_nothing(tmp_path):
    result = invoke("run", "-c", FULL, "-w", tmp_path / "w", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "w").exists()
    plan = {m["module"]: m for m in json.loads(result.stdout)["modules"]}
    h, kv, ffn, vocab = 4096, 256, 13696, 151552
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * ffn + 4 * h
    assert plan["decoder"]["parameters"] == 40 * layer + h + vocab * h
    assert plan["embed"]["parameters"] == vocab * h
    assert plan["decoder"]["external_data"] and plan["decoder"]["onnx_bytes_estimate"] > 2**31
    assert 8.5e9 < sum(m["parameters"] for m in plan.values()) < 11e9
    assert all(not s["cached"] for s in json.loads(result.stdout)["stages"])


@pytest.mark.parametrize(
    "changes, args, message",
    [
        ({"vision": {"dept": 2}}, [], "vision.dept: unknown field; valid fields here: depth"),
        ({"text": {"num_hidden_layers": "two"}}, [], "text.num_hidden_layers: Input should be a valid integer"),
        ({}, ["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt: checkpoint directory not found"),
        ({}, ["-m", "speech"], "unknown module 'speech'; valid: vision, audio, embed, decoder"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, changes, args, message):
    config = write_config(tmp_path / "c.yaml", changes)
    workdir = tmp_path / "w"
    result = invoke("export", "-c", config, "-w", workdir, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[0].startswith("error: ")
    assert not workdir.exists()


def test_pickle_checkpoint_refused_from_cli(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = invoke("export", "-c", TINY, "-w", tmp_path / "w", "--checkpoint", ckpt)
    assert result.exit_code == 2 and "only pickle weights here" in result.stderr
    assert not (tmp_path / "w").exists()


def test_accuracy_failure_exits_3(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"export": {"tolerances": {"audio": {"atol": 0, "rtol": 0}}}})
    result = invoke("export", "-c", config, "-w", tmp_path / "w", "-m", "audio")
    assert result.exit_code == 3 and "differs from PyTorch" in result.stderr


def test_inspect_checks_artifacts(tiny_build_copy):
    result = invoke("inspect", "-w", tiny_build_copy, "--json")
    report = json.loads(result.stdout)
    assert {a["state"] for a in report["artifacts"].values()} == {"ok"}
    (tiny_build_copy / "onnx" / "vision.onnx").write_bytes(b"corrupt")
    result = invoke("inspect", "-w", tiny_build_copy)
    assert result.exit_code == 0 and "modified" in result.stdout


def test_inspect_without_manifest(tmp_path):
    result = invoke("inspect", "-w", tmp_path)
    assert result.exit_code == 2 and "no manifest.json here" in result.stderr


def test_calibrate_options_reach_the_stage(tiny_build_copy):
    from autoglm_build.manifest import Manifest

    assert invoke("optimize", "-c", TINY, "-w", tiny_build_copy, "-m", "audio").exit_code == 0
    result = invoke("calibrate", "-c", TINY, "-w", tiny_build_copy, "-m", "audio", "--int8", "--method", "minmax",
                    "--batches", "1")
    assert result.exit_code == 0, result.output
    record = Manifest.load(tiny_build_copy).record("calibrate-int8", "audio")
    assert record.params["method"] == "minmax"


def test_version_prints_the_version_and_exits_0():
    from autoglm_build import __version__

    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == __version__


def _bracketed_helps():
    """(command, help text) of every option whose help holds a bracket, the root's options included."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in [("", group)] + sorted(group.commands.items()):
        for param in command.params:
            if getattr(param, "help", None) and "[" in param.help:
                yield name, param.help.replace("\\[", "[")


@pytest.mark.parametrize("command, text", list(_bracketed_helps()))
def test_bracketed_defaults_survive_rich_markup_in_help(command, text):
    result = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert " ".join(text.split()) in " ".join(result.stdout.split())


def test_optimize_table_says_why_a_fusion_is_skipped_at_opset_17(tiny_build_copy, monkeypatch):
    from rich.console import Console

    from autoglm_build import render

    wide = Console(record=True, width=400, file=open("/dev/null", "w"))
    monkeypatch.setattr(render, "stdout", wide)
    result = invoke("optimize", "-c", TINY, "-w", tiny_build_copy, "-m", "embed")
    assert result.exit_code == 0, result.output
    text = wide.export_text()
    assert "fuse-gelu: skipped: needs opset >= 20" in text
    assert "fuse-rmsnorm: skipped: needs opset >= 23" in text


def test_bench_defaults_to_the_configs_batch_sizes(tmp_path, monkeypatch):
    import autoglm_build.bench

    seen = {}

    def fake_bench(cfg, workdir, names, sizes, *args, **kwargs):
        seen["sizes"] = sizes
        return {"config": cfg.name, "rows": [], "notes": [], "peaks": None}

    monkeypatch.setattr(autoglm_build.bench, "bench", fake_bench)
    config = write_config(tmp_path / "c.yaml", {"export": {"batch_sizes": [1, 2]}})
    result = invoke("bench", "-c", config, "-w", tmp_path / "w", "-m", "embed", "--json")
    assert result.exit_code == 0, result.output
    assert seen["sizes"] == [1, 2]


def test_verify_help_names_the_configs_batches_and_rows_land_in_the_manifest(trust_copy, trust_config):
    from autoglm_build.manifest import Manifest

    help_text = " ".join(runner.invoke(app, ["verify", "--help"], env={"COLUMNS": "300"}).stdout.split())
    assert "export.batch_sizes" in help_text and "batch 1, 4, 8" not in help_text
    result = invoke("verify", "-c", trust_config, "-w", trust_copy, "-m", "embed", "--precision", "fp16", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows and {r["batch"] for r in rows} == {1, 4, 8}
    record = Manifest.load(trust_copy).record("verify", "embed")
    assert record is not None and record.metrics["rows"] == rows and record.status == "done"


@pytest.mark.parametrize("change, says", [
    ({"tokenizer": "/nonexistent/tokenizer.json"}, "/nonexistent/tokenizer.json: tokenizer file not found"),
    ({"text": {"vocab_size": 1000}}, "is outside text.vocab_size 1000"),
])
def test_a_bad_tokenizer_stops_run_before_anything_is_written(tmp_path, change, says):
    config = write_config(tmp_path / "c.yaml", change)
    workdir = tmp_path / "w"
    result = invoke("run", "-c", config, "-w", workdir, "-m", "embed")
    assert result.exit_code == 2, result.output
    assert says in result.stderr.strip().splitlines()[0]
    assert not workdir.exists()  # export and optimize wrote nothing
    plan = invoke("run", "-c", config, "-w", workdir, "-m", "embed", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "run would stop before its first stage" in plan.stderr and says in " ".join(plan.stderr.split())
    assert not workdir.exists()
