from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from autoglm_build.errors import CheckpointError
from autoglm_build.modules import registry
from autoglm_build.weights import Checkpoint
from tests.conftest import TINY


def _embed_ckpt(tmp_path, cfg, shape=None):
    t = cfg.text
    weight = torch.randn(*(shape or (t.vocab_size, t.hidden_size)))
    save_file({"model.language_model.embed_tokens.weight": weight}, str(tmp_path / "model.safetensors"))
    return weight


def test_pickle_checkpoint_is_refused_without_loading(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="only pickle weights here \\(pytorch_model.bin\\); .*never unpickles"):
        Checkpoint(tmp_path)


def test_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        Checkpoint(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        Checkpoint(tmp_path)


def test_loads_with_either_key_layout(tmp_path, tiny_cfg):
    weight = _embed_ckpt(tmp_path, tiny_cfg)
    module = registry.get("embed").build(tiny_cfg)
    report = Checkpoint(tmp_path).load_into(module, registry.get("embed").weight_prefixes, "embed")
    assert report.loaded == 1 and report.prefixes == {"embed_tokens.": "model.language_model.embed_tokens."}
    assert torch.equal(module.embed_tokens.weight, weight)


def test_shape_mismatch_names_key_and_shapes(tmp_path, tiny_cfg):
    _embed_ckpt(tmp_path, tiny_cfg, shape=(10, tiny_cfg.text.hidden_size))
    module = registry.get("embed").build(tiny_cfg)
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: shape \(10, 128\) does not fit module 'embed'"):
        Checkpoint(tmp_path).load_into(module, registry.get("embed").weight_prefixes, "embed")


def test_missing_module_weights_say_what_was_looked_for(tmp_path, tiny_cfg):
    _embed_ckpt(tmp_path, tiny_cfg)
    spec = registry.get("vision")
    with pytest.raises(CheckpointError, match="no weights for module 'vision' \\(looked for 'model.visual."):
        Checkpoint(tmp_path).load_into(spec.build(tiny_cfg), spec.weight_prefixes, "vision")


def test_fingerprint_changes_with_content_layout(tmp_path, tiny_cfg):
    _embed_ckpt(tmp_path, tiny_cfg)
    before = Checkpoint(tmp_path).fingerprint()
    _embed_ckpt(tmp_path, tiny_cfg, shape=(10, tiny_cfg.text.hidden_size))
    assert Checkpoint(tmp_path).fingerprint() != before


def test_checkpoint_config_json_must_agree_on_what_shapes_cannot_show(tmp_path, tiny_cfg):
    from tests.helpers import save_hf_checkpoint

    save_hf_checkpoint(tiny_cfg, tmp_path, shards=1)
    Checkpoint(tmp_path).check_config(tiny_cfg)  # transformers' own config.json agrees
    other = tiny_cfg.model_copy(update={"text": tiny_cfg.text.model_copy(update={"partial_rotary_factor": 1.0})})
    with pytest.raises(CheckpointError, match="config.json: text_config partial_rotary_factor is 0.5, the build "
                                              "config's text.partial_rotary_factor is 1.0"):
        Checkpoint(tmp_path).check_config(other)


# ---- streaming: modules built on the meta device, filled tensor by tensor ----------------------------


def _layout_ckpt(cfg, directory, shard_mib=0.25):
    from autoglm_build.layout import write_checkpoint

    write_checkpoint(cfg, directory, shard_mib=shard_mib)
    return Checkpoint(directory)


def _streamed(spec, cfg, checkpoint):
    from autoglm_build.weights import empty_parameters

    with empty_parameters():
        module = spec.build(cfg)
    assert all(p.is_meta for p in module.parameters())
    return module, checkpoint.load_into(module, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)


def test_streamed_load_equals_building_then_copying_into(tmp_path, tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"decoder": tiny_cfg.decoder.model_copy(update={"stages": 2})})
    checkpoint = _layout_ckpt(cfg, tmp_path)
    assert len(checkpoint.files) > 2  # sharded, read through the index
    for name in ["vision", "audio", "embed", "decoder", "decoder.stage0", "decoder.stage1"]:
        spec = registry.get(name)
        old = spec.build(cfg)
        old_report = checkpoint.load_into(old, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)
        new, report = _streamed(registry.get(name), cfg, checkpoint)
        assert report.loaded == old_report.loaded and report.unused == old_report.unused == []
        want, got = old.state_dict(), new.state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) and got[k].dtype == torch.float32 for k in want), name
        assert {n: b for n, b in new.named_buffers()}.keys() == {n: b for n, b in old.named_buffers()}.keys()
        assert all(torch.equal(a, b) for a, b in zip(new.buffers(), old.buffers()))  # rotary tables: computed
        assert [p.requires_grad for p in new.parameters()] == [p.requires_grad for p in old.parameters()]


def test_a_stage_materializes_only_its_own_layers(tmp_path, tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"decoder": tiny_cfg.decoder.model_copy(update={"stages": 2})})
    module, report = _streamed(registry.get("decoder.stage0"), cfg, _layout_ckpt(cfg, tmp_path))
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("language_model.layers.0.") for n in names)  # no norm, no LM head


def test_the_index_decides_which_file_a_tensor_comes_from(tmp_path, tiny_cfg):
    checkpoint = _layout_ckpt(tiny_cfg, tmp_path)
    t = tiny_cfg.text
    # a stray file beside the shards (an older save, a consolidated copy) is not read
    save_file({"model.language_model.embed_tokens.weight": torch.zeros(3, 3)}, str(tmp_path / "stray.safetensors"))
    assert Checkpoint(tmp_path).fingerprint() == checkpoint.fingerprint()
    module, _ = _streamed(registry.get("embed"), tiny_cfg, Checkpoint(tmp_path))
    assert module.embed_tokens.weight.shape == (t.vocab_size, t.hidden_size)


def _edit_index(directory, change):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))
    return path


def test_an_index_naming_a_shard_that_is_not_there(tmp_path, tiny_cfg):
    _layout_ckpt(tiny_cfg, tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"lm_head.weight": "model-00009-of-00009.safetensors"}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: weight_map: 'lm_head.weight' is in "
                                              r"'model-00009-of-00009.safetensors', which is not a file of"):
        Checkpoint(tmp_path)


def test_an_index_listing_a_tensor_its_shard_lacks(tmp_path, tiny_cfg):
    _layout_ckpt(tiny_cfg, tmp_path)
    _edit_index(tmp_path, lambda wm: wm.update({"lm_head.bias": wm["lm_head.weight"]}))
    with pytest.raises(CheckpointError, match=r"index.json: weight_map: 'lm_head.bias' is listed in model-0000\d-of"
                                              r"-\d+.safetensors, whose header has no such tensor"):
        Checkpoint(tmp_path)


def test_a_tensor_missing_from_the_index_is_named_before_anything_is_read(tmp_path, tiny_cfg):
    _layout_ckpt(tiny_cfg, tmp_path)
    _edit_index(tmp_path, lambda wm: wm.pop("model.language_model.layers.1.self_attn.v_proj.bias"))
    spec = registry.get("decoder")
    from autoglm_build.weights import empty_parameters

    with empty_parameters():
        module = spec.build(tiny_cfg)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: tensor 'model.language_model.layers.1"
                                              r".self_attn.v_proj.bias' for module 'decoder' is missing"):
        Checkpoint(tmp_path).load_into(module, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)
    assert all(p.is_meta for p in module.parameters())  # nothing was read


def test_a_wrong_shape_is_named_from_the_header_before_anything_is_read(tmp_path, tiny_cfg):
    from autoglm_build.weights import empty_parameters

    cfg = tiny_cfg.model_copy(update={"text": tiny_cfg.text.model_copy(update={"intermediate_size": 192})})
    checkpoint = _layout_ckpt(tiny_cfg, tmp_path)
    spec = registry.get("decoder")
    with empty_parameters():
        module = spec.build(cfg)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+.safetensors: model.language_model.layers.0.mlp."
                                              r"gate_up_proj.weight: shape \(512, 128\) does not fit module 'decoder' "
                                              r"\(\(384, 128\)\)"):
        checkpoint.load_into(module, spec.weight_prefixes, spec.name, spec.checkpoint_ignore)
    assert all(p.is_meta for p in module.parameters())


def test_export_refuses_a_broken_index_with_one_line_and_exit_2(tmp_path, tiny_cfg):
    from typer.testing import CliRunner

    from autoglm_build.cli import app

    _layout_ckpt(tiny_cfg, tmp_path / "ckpt")
    index = _edit_index(tmp_path / "ckpt", lambda wm: wm.update({"lm_head.bias": wm["lm_head.weight"]}))
    result = CliRunner().invoke(app, ["export", "-c", str(TINY), "-w", str(tmp_path / "w"), "-m", "decoder",
                                      "--checkpoint", str(tmp_path / "ckpt")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{index}: weight_map: 'lm_head.bias'" in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "w").exists()
