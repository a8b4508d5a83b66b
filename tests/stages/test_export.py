"""The export stage: symbolic batch, ORT at batch 1/4/8, decoder vs generate, checkpoints, failures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from autoglm_build.config import load_config
from autoglm_build.console import Reporter
from autoglm_build.errors import AccuracyError
from autoglm_build.modules import registry
from autoglm_build.pipeline import Pipeline
from autoglm_build.stages.export import ExportStage
from tests.conftest import TINY, write_config
from tests.helpers import run_onnx, save_hf_checkpoint


def _export(cfg, workdir, modules, checkpoint=None):
    stage = ExportStage(checkpoint=checkpoint)
    return Pipeline(cfg, workdir, [stage], modules, reporter=Reporter(-1)).run()


def test_graphs_have_symbolic_batch_and_run_at_1_4_8(tiny_build, tiny_cfg):
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    for name in registry.names():
        spec = registry.get(name)
        model = onnx.load(str(tiny_build / "onnx" / f"{name}.onnx"), load_external_data=False)
        assert model.opset_import[0].version == 17
        for graph_input in model.graph.input:
            assert graph_input.type.tensor_type.shape.dim[0].dim_param == spec.batch_axis, (name, graph_input.name)
        record = manifest["records"][f"export/{name}"]
        assert record["metrics"]["passed"] and record["metrics"]["batches"] == [1, 4, 8]
        for case in spec.cases(tiny_cfg, np.random.default_rng(0)):
            outputs = run_onnx(tiny_build / "onnx" / f"{name}.onnx", case.steps[0])
            assert spec.feed_items(case.steps[0]) == case.batch
            if spec.batch_axis == "batch":
                assert all(v.shape[0] == case.batch for v in outputs.values())
            else:  # packed images: one token per merge window of every image
                assert outputs["image_embeds"].shape[0] == len(case.steps[0]["patch_pos"]) // 4


def test_decoder_and_sequence_axes_are_named(tiny_build, tiny_cfg):
    model = onnx.load(str(tiny_build / "onnx" / "decoder.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(model.graph.input) + list(model.graph.output)}
    t = tiny_cfg.text
    assert dims["inputs_embeds"] == ["batch", "seq", t.hidden_size]
    assert dims["attention_mask"] == ["batch", "total_seq"]
    assert dims["past_key.0"] == ["batch", t.num_key_value_heads, "past_seq", t.head_dim]
    assert dims["present_value.1"] == ["batch", t.num_key_value_heads, "total_seq", t.head_dim]
    assert dims["logits"] == ["batch", t.vocab_size]
    audio = onnx.load(str(tiny_build / "onnx" / "audio.onnx"))
    assert [d.dim_param or d.dim_value for d in audio.graph.input[0].type.tensor_type.shape.dim] == [
        "batch", 128, "audio_frames"]


def test_decoder_onnx_follows_transformers_generate_step_by_step(tmp_path, tiny_cfg):
    """ORT prefill + decode from the returned cache reproduces Glm4vForConditionalGeneration.generate."""
    ckpt = tmp_path / "ckpt"
    model, _ = save_hf_checkpoint(tiny_cfg, ckpt)
    _export(tiny_cfg, tmp_path / "w", ["embed", "decoder"], checkpoint=ckpt)
    prompt = torch.randint(0, tiny_cfg.text.vocab_size, (2, 6))
    steps = 5
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             min_new_tokens=steps)
    onnx_dir = tmp_path / "w" / "onnx"
    layers, t = tiny_cfg.text.num_hidden_layers, tiny_cfg.text
    feed = {f"past_{k}.{i}": np.zeros((2, t.num_key_value_heads, 0, t.head_dim), np.float32)
            for i in range(layers) for k in ("key", "value")}
    ids = prompt.numpy()
    total = 0
    for step in range(steps):
        embeds = run_onnx(onnx_dir / "embed.onnx", {"input_ids": ids})["inputs_embeds"]
        seq = ids.shape[1]
        positions = np.arange(total, total + seq)[None, None, :].repeat(2, 0).repeat(3, 1)
        total += seq
        feed.update(inputs_embeds=embeds, attention_mask=np.ones((2, total), np.int64), position_ids=positions)
        out = run_onnx(onnx_dir / "decoder.onnx", feed)
        np.testing.assert_allclose(out["logits"], gen.logits[step].numpy(), rtol=1e-4, atol=2e-5)
        next_ids = gen.sequences[:, prompt.shape[1] + step].numpy()
        assert (out["logits"].argmax(-1) == next_ids).all()
        ids = next_ids[:, None]
        feed = {f"past_{k}.{i}": out[f"present_{k}.{i}"] for i in range(layers) for k in ("key", "value")}


def test_checkpoint_export_is_identical_to_in_memory_model(tmp_path, tiny_cfg):
    ckpt = tmp_path / "ckpt"
    model, audio = save_hf_checkpoint(tiny_cfg, ckpt)
    outcomes = _export(tiny_cfg, tmp_path / "w", ["vision", "audio"], checkpoint=ckpt)
    assert all(o.record.params["weights"] == str(ckpt) for o in outcomes)
    spec = registry.get("vision")
    images = spec.random_images(tiny_cfg, np.random.default_rng(0), [(644, 280), (112, 168)])
    feats = np.random.default_rng(1).standard_normal((2, 128, 400)).astype(np.float32)
    grid = torch.tensor([[1, 46, 20], [1, 8, 12]])
    with torch.no_grad():  # transformers' own packed forward on the checkpoint's weights
        want_image = model.model.visual(torch.from_numpy(images["pixel_values"]), grid).pooler_output.numpy()
        want_audio = audio(torch.from_numpy(feats)).numpy()
    got_image = run_onnx(tmp_path / "w" / "onnx" / "vision.onnx", images)["image_embeds"]
    got_audio = run_onnx(tmp_path / "w" / "onnx" / "audio.onnx", {"input_features": feats})["audio_embeds"]
    np.testing.assert_allclose(got_image, want_image, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_audio, want_audio, rtol=1e-4, atol=1e-6)


def test_out_of_tolerance_fails_with_numbers_and_writes_nothing(tmp_path):
    path = write_config(tmp_path / "strict.yaml", {"export": {"tolerances": {"audio": {"atol": 0, "rtol": 0}}}})
    cfg = load_config(path)
    workdir = tmp_path / "w"
    with pytest.raises(AccuracyError, match=r"audio: ONNX Runtime differs from PyTorch on 'audio_embeds'.*max abs"):
        _export(cfg, workdir, ["audio"])
    assert not list((workdir / "onnx").glob("*")) and not list(workdir.glob(".export-*"))
    record = json.loads((workdir / "manifest.json").read_text())["records"]["export/audio"]
    assert record["status"] == "failed" and record["metrics"]["rows"] and not record["artifacts"]


def test_large_weights_go_to_one_external_data_file(tmp_path):
    path = write_config(tmp_path / "ext.yaml", {"export": {"large_model_bytes": 100_000}})
    cfg = load_config(path)
    _export(cfg, tmp_path / "w", ["decoder"])
    files = sorted(p.name for p in (tmp_path / "w" / "onnx").iterdir())
    assert files == ["decoder.onnx", "decoder.onnx.data"]
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    kinds = {a["kind"] for a in manifest["artifacts"].values()}
    assert kinds == {"onnx", "onnx-data"}
    onnx_dir = tmp_path / "w" / "onnx"
    assert (onnx_dir / "decoder.onnx").stat().st_size * 10 < (onnx_dir / "decoder.onnx.data").stat().st_size


def test_tiny_config_file_is_the_default_test_config():
    assert load_config(TINY).name == "autoglm-phone-tiny"


@pytest.mark.slow
def test_export_from_the_published_layout_equals_the_same_weights_loaded_the_old_way(tmp_path, tiny_cfg):
    """A checkpoint in the published layout (BF16 shards and their index, scripts/make_layout_checkpoint.py)
    through `autoglm-build export --checkpoint`: each graph computes what the module built with its
    seeded init and then copied into (the loader before streaming) computes, and the export records
    and prints its peak RSS."""
    from typer.testing import CliRunner

    from autoglm_build.cli import app
    from autoglm_build.layout import write_checkpoint
    from autoglm_build.weights import Checkpoint

    ckpt, workdir = tmp_path / "ckpt", tmp_path / "w"
    write_checkpoint(tiny_cfg, ckpt, shard_mib=0.5)
    result = CliRunner().invoke(app, ["export", "-c", str(TINY), "-w", str(workdir), "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    records = json.loads((workdir / "manifest.json").read_text())["records"]
    checkpoint = Checkpoint(ckpt)
    for name in tiny_cfg.modules:
        assert f"export {name}: done in" in result.stderr and "peak RSS" in result.stderr
        record = records[f"export/{name}"]
        assert record["params"]["weights"] == str(ckpt.resolve()) and record["metrics"]["peak_rss_mib"] > 0
        spec = registry.get(name)
        module = spec.build(tiny_cfg)
        checkpoint.load_into(module, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)
        feed = spec.export_inputs(tiny_cfg)
        got = run_onnx(workdir / "onnx" / f"{name}.onnx", feed)
        with torch.no_grad():
            want = module(*[torch.from_numpy(feed[n]) for n in spec.input_names(tiny_cfg)])
        want = want if isinstance(want, tuple) else (want,)
        for out, value in zip(spec.output_names(tiny_cfg), want):
            np.testing.assert_allclose(got[out], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{name}.{out}")


def test_streamed_build_exports_the_bytes_the_copy_into_build_exported(tmp_path, tiny_cfg, monkeypatch):
    """The trained tiny checkpoint: graphs from modules built on the meta device and filled tensor by
    tensor are the graphs of modules built with their random init and copied into, byte for byte."""
    import contextlib

    from autoglm_build import weights

    ckpt = load_config(TINY).checkpoint
    _export(tiny_cfg, tmp_path / "streamed", ["audio", "decoder"], checkpoint=ckpt)
    monkeypatch.setattr(weights, "empty_parameters", contextlib.nullcontext)
    _export(tiny_cfg, tmp_path / "copied", ["audio", "decoder"], checkpoint=ckpt)
    for name in ("audio.onnx", "decoder.onnx"):
        streamed = (tmp_path / "streamed" / "onnx" / name).read_bytes()
        assert streamed == (tmp_path / "copied" / "onnx" / name).read_bytes(), name
