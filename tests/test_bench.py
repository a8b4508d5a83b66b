"""``bench``: rows for every backend side by side, stored in the manifest; the floors' sizes are exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoglm_build.bench import cases, decode_step_bytes, decoder_parameters, find_case, vision_flops
from autoglm_build.cli import app
from autoglm_build.config import load_config
from autoglm_build.errors import UserError
from autoglm_build.manifest import Manifest
from autoglm_build.runtime.kv_cache import CacheSpec
from tests.conftest import TINY


def test_bench_cli_times_torch_and_onnxruntime_side_by_side(tiny_build_copy: Path):
    result = CliRunner().invoke(app, ["bench", "-c", str(TINY), "-w", str(tiny_build_copy), "-m", "vision",
                                      "-m", "decoder", "--batches", "1,2", "--backends", "torch,ort,trt",
                                      "--prompt", "16", "--past", "16", "--min-time", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    keys = {(r["module"], r["case"], r["batch"], r["backend"]) for r in report["rows"]}
    for torch_label, ort_label in (("torch sdpa fp32", "onnxruntime fp32"),):
        for backend in (torch_label, ort_label):
            assert ("vision", "112px", 2, backend) in keys
            assert ("vision", "screenshot 1080x2400 (920 patches)", 1, backend) in keys
    for backend in ("torch fp32", "onnxruntime fp32"):
        assert ("decoder", "prefill 16", 1, backend) in keys and ("decoder", "decode @16", 2, backend) in keys
    for r in report["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iters"] >= 10
    skipped = [n for n in report["notes"] if "tensorrt skipped" in n]
    assert len(skipped) == 1  # no TensorRT on CI (asked for as `trt`): said once, not once per module
    stored = Manifest.load(tiny_build_copy).record("bench", "decoder").metrics["rows"]
    assert len(stored) == 8  # 2 cases x 2 batches x 2 backends


def test_bench_rejects_bad_arguments(tiny_build_copy: Path):
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "-c", str(TINY), "-w", str(tiny_build_copy), "--backends", "tensorflow"])
    assert bad.exit_code == 2 and "tensorflow" in bad.output
    bad = runner.invoke(app, ["bench", "-c", str(TINY), "-w", str(tiny_build_copy), "--past", "50000"])
    assert bad.exit_code == 2 and "engine.context" in bad.output


def test_floor_sizes_match_the_modules(tiny_cfg):
    torch = pytest.importorskip("torch")
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from autoglm_build.modules import registry

    spec = registry.get("vision")
    vision = spec.build(tiny_cfg)
    feed = spec.random_images(tiny_cfg, np.random.default_rng(0), [(644, 280)])  # one tiny-config screenshot
    with FlopCounterMode(display=False) as counter:
        vision(*(torch.from_numpy(feed[n]) for n in spec.input_names(tiny_cfg)))
    assert counter.get_total_flops() == vision_flops(tiny_cfg, [920])
    decoder = registry.get("decoder").build(tiny_cfg)
    assert sum(p.numel() for p in decoder.parameters()) == decoder_parameters(tiny_cfg)
    t = tiny_cfg.text
    kv = 2 * t.num_hidden_layers * 8 * t.num_key_value_heads * 512 * t.head_dim * 2
    assert decode_step_bytes(tiny_cfg, 8, 512, "fp16") == 2 * decoder_parameters(tiny_cfg) + kv
    assert CacheSpec.of(tiny_cfg.text).bytes(8 * 512, 2) == kv  # what the server's caches count (block_bytes)


def test_a_later_run_shows_the_rows_an_earlier_one_stored(tiny_build_copy: Path):
    """The device bench runs torch on one Python and TensorRT on another: the second run's table
    shows the first run's rows beside its own."""
    base = ["bench", "-c", str(TINY), "-w", str(tiny_build_copy), "-m", "vision", "--batches", "1",
            "--min-time", "0", "--json"]
    runner = CliRunner()
    first = runner.invoke(app, base + ["--backends", "torch"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, base + ["--backends", "onnxruntime"])
    report = json.loads(second.stdout)
    # vision at batch 1: the 112px image and the 1080x2400 screenshot
    assert [r["backend"] for r in report["rows"]] == ["onnxruntime fp32"] * 2
    assert [r["backend"] for r in report["stored_rows"]] == ["torch sdpa fp32"] * 2
    table = runner.invoke(app, base[:-1] + ["--backends", "onnxruntime"])
    assert "torch sdpa fp32 (stored)" in table.stdout and "onnxruntime fp32" in table.stdout


def test_find_case_picks_by_name_and_batch():
    cfg = load_config(TINY)
    case = find_case(cfg, "decoder", 3, "decode", prompt=9, past=5)
    assert (case["case"], case["batch"], case["phase"]) == ("decode @5", 3, "decode")
    assert case["feed"]["past_key.0"].shape[0] == 3 and case["feed"]["past_key.0"].shape[2] == 5
    with pytest.raises(UserError, match="no bench case named like 'decode'.*112px"):
        find_case(cfg, "vision", 1, "decode")


def test_a_prefill_beyond_the_profile_is_timed_as_the_servers_chunks():
    """A prompt longer than ``engine.prefill_chunk`` (the phone agent's 3,300 new tokens on a 1,024-token
    profile) is a list of chunks for the engines: each at most the chunk, each after the cache of the
    earlier ones, together the prompt; a prompt the profile holds has none."""
    cfg = load_config(TINY)
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"prefill_chunk": 8})})
    found = {c["case"]: c for c in cases(cfg, "decoder", [2], prompt=19, past=30, prefix=40)}
    chunks = found["prefill 19 after 40"]["chunks"]
    assert [c["inputs_embeds"].shape[:2] for c in chunks] == [(2, 8), (2, 8), (2, 3)]
    assert [c["past_key.0"].shape[2] for c in chunks] == [40, 48, 56]
    assert [c["attention_mask"].shape[1] for c in chunks] == [48, 56, 59]
    assert found["prefill 19 after 40"]["feed"]["inputs_embeds"].shape[1] == 19  # whole, for the other backends
    assert [c["past_key.0"].shape[2] for c in found["prefill 19"]["chunks"]] == [0, 8, 16]
    assert "chunks" not in found["decode @30"]
    assert all(c.get("chunks") is None for c in cases(cfg, "decoder", [1], prompt=8, past=30, prefix=4))
    one_row = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"prefill_batch": 1})})
    assert [(c["case"], c["batch"]) for c in cases(one_row, "decoder", [1, 8], prompt=8, past=30, prefix=4)] == [
        ("prefill 8", 1), ("decode @30", 1), ("prefill 8 after 4", 1), ("decode @30", 8)]  # the profile's rows


def test_torch_sdpa_row_computes_what_the_eager_row_does(tiny_cfg, tmp_path: Path):
    """The decoder's torch sdpa baseline (the fairer prefill row on a GPU) shares the eager row's model
    and gives its outputs (padded row, a cache and new tokens), switching back and forth per call."""
    import numpy as np
    import torch

    from autoglm_build.bench import _Torch
    from autoglm_build.modules import registry

    eager = _Torch(tiny_cfg, tmp_path, "decoder")
    sdpa = eager.with_sdpa()
    assert sdpa.model is eager.model and (eager.label, sdpa.label) == ("torch fp32", "torch sdpa fp32")
    feed = registry.get("decoder").step_inputs(tiny_cfg, np.random.default_rng(1), batch=2, seq=5, past=7, pad=3)
    case = {"feed": feed}
    a, b, a2 = eager.prepare(case)(), sdpa.prepare(case)(), eager.prepare(case)()
    for x, y, z in zip(a, b, a2):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
        assert torch.equal(x, z)
