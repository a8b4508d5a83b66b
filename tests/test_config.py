from __future__ import annotations

import pytest

from autoglm_build.config import load_config
from autoglm_build.errors import ConfigError
from tests.conftest import FULL, TINY, write_config


def test_full_config_is_glm41v_9b():
    cfg = load_config(FULL)
    v, t, a = cfg.vision, cfg.text, cfg.audio
    assert (v.depth, v.hidden_size, v.num_heads, v.patch_size, v.image_size, v.out_hidden_size) == (
        24, 1536, 12, 14, 336, 4096)
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (40, 4096, 32, 2)
    assert (t.intermediate_size, t.vocab_size, t.head_dim) == (13696, 151552, 128)
    assert (a.num_mel_bins, a.d_model, a.encoder_layers, a.encoder_attention_heads) == (128, 1280, 32, 20)
    assert v.num_tokens == 144


def test_full_config_agrees_with_transformers_glm4v_defaults():
    from transformers import Glm4vConfig

    hf = Glm4vConfig()
    cfg = load_config(FULL)
    for field in ("depth", "hidden_size", "num_heads", "patch_size", "image_size", "out_hidden_size",
                  "spatial_merge_size", "temporal_patch_size", "intermediate_size"):
        assert getattr(cfg.vision, field) == getattr(hf.vision_config, field), field
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size"):
        assert getattr(cfg.text, field) == getattr(hf.text_config, field), field


def test_tiny_is_same_architecture_smaller():
    tiny, full = load_config(TINY), load_config(FULL)
    assert tiny.text.num_attention_heads > tiny.text.num_key_value_heads > 0  # GQA kept
    assert tiny.text.hidden_size < full.text.hidden_size
    assert tiny.modules == full.modules


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"vision": {"dept": 3}}, "vision.dept: unknown field; valid fields here: depth, hidden_size"),
        ({"text": {"hidden_size": "wide"}}, "text.hidden_size: Input should be a valid integer"),
        ({"bogus": 1}, "bogus: unknown field; valid fields here: schema_version, name"),
        ({"export": {"tolerances": {"decoder": {"atoll": 1}}}}, "export.tolerances.decoder.atoll: unknown field; "
                                                                "valid fields here: atol, rtol"),
        ({"vision": {"out_hidden_size": 64}}, "vision.out_hidden_size: 64 must equal text.hidden_size 128"),
        ({"text": {"mrope_section": [1, 1, 1]}}, "text.mrope_section: sums to 3"),
        ({"modules": ["vision", "speech"]}, "modules: unknown module 'speech'; valid: vision, audio, embed, decoder"),
        ({"export": {"audio_frames": [401]}}, "export.audio_frames: 401 must be a multiple of 8"),
        ({"engine": {"context": 16}}, "engine.opt_seq: 64 exceeds engine.context 16"),  # not the chunk's name
        ({"engine": {"prefill_chunk": 16}}, "engine.opt_seq: 64 exceeds engine.prefill_chunk 16"),
        ({"engine": {"prefill_batch": 9}}, "engine.prefill_batch: 9 exceeds engine.max_batch 8"),
        ({"engine": {"prefill_batch": 2}}, "export.batch_sizes: 8 exceeds engine.prefill_batch 2"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, changes, expected):
    path = write_config(tmp_path / "bad.yaml", changes)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = err.value.message
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_and_unparsable_config(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line"):
        load_config(bad)
