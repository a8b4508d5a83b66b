from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from autoglm_build.errors import CheckpointError
from autoglm_build.modules import registry
from autoglm_build.weights import Checkpoint


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
