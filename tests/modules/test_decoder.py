"""The explicit-cache decoder computes what transformers' Glm4vTextModel with a DynamicCache does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_build.modules import registry
from autoglm_build.modules.decoder import _recomposition_frequencies, _rotate_half_llm


def test_export_patches_compute_the_same_as_transformers(tiny_cfg):
    from transformers.models.glm4v import modeling_glm4v as g

    from autoglm_build.modules.hf_configs import text_config

    x = torch.randn(2, 4, 5, 16)
    assert torch.equal(_rotate_half_llm(x), g.rotate_half_llm(x))
    rotary = g.Glm4vTextRotaryEmbedding(text_config(tiny_cfg.text))
    freq = torch.randn(3, 2, 5, sum(tiny_cfg.text.mrope_section))
    assert torch.equal(_recomposition_frequencies(rotary, freq), rotary.recomposition_frequencies(freq))


def _reference(tiny_cfg, decoder):
    from transformers.models.glm4v.modeling_glm4v import Glm4vTextModel

    from autoglm_build.modules.hf_configs import text_config

    ref = Glm4vTextModel(text_config(tiny_cfg.text)).eval()
    missing, unexpected = ref.load_state_dict(decoder.language_model.state_dict(), strict=False)
    assert missing == ["embed_tokens.weight"] and not unexpected
    return ref


@pytest.mark.parametrize("pad", [0, 2])
def test_prefill_then_decode_matches_dynamic_cache(tiny_cfg, pad):
    from transformers import DynamicCache

    spec = registry.get("decoder")
    decoder = spec.build(tiny_cfg)
    ref = _reference(tiny_cfg, decoder)
    rng = np.random.default_rng(0)
    batch, seq, layers = 3, 6, tiny_cfg.text.num_hidden_layers
    cache = DynamicCache(config=ref.config)
    past = None
    for step in range(4):
        length = seq if step == 0 else 1
        feed = spec.step_inputs(tiny_cfg, rng, batch, length, past=0 if step == 0 else seq + step - 1, pad=pad)
        embeds = torch.from_numpy(feed["inputs_embeds"])
        mask = torch.from_numpy(feed["attention_mask"])
        pos = torch.from_numpy(feed["position_ids"])
        if past is None:
            past = [torch.from_numpy(feed[f"past_{k}.{i}"]) for i in range(layers) for k in ("key", "value")]
        with torch.no_grad():
            logits, *past = decoder(embeds, mask, pos, *past)
            hidden = ref(inputs_embeds=embeds, attention_mask=mask, position_ids=pos.permute(1, 0, 2),
                         past_key_values=cache, use_cache=True).last_hidden_state
            want = decoder.lm_head(hidden[:, -1])
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)  # left padding: last token is real
        torch.testing.assert_close(past[0], cache.layers[0].keys, rtol=1e-4, atol=1e-5)
