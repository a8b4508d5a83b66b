"""The speech wrapper runs transformers' WhisperEncoder math over any frame count."""

from __future__ import annotations

import torch

from autoglm_build.modules import registry


def test_encoder_matches_whisper_encoder_at_30s(tiny_cfg):
    module = registry.get("audio").build(tiny_cfg)
    feats = torch.randn(2, tiny_cfg.audio.num_mel_bins, tiny_cfg.audio.max_frames) * 0.5
    with torch.no_grad():
        ref = module.encoder(feats).last_hidden_state
        ours = module.encode(feats)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_short_clip_equals_prefix_positions_and_projects_to_decoder_width(tiny_cfg):
    a = tiny_cfg.audio
    module = registry.get("audio").build(tiny_cfg)
    feats = torch.randn(1, a.num_mel_bins, 400) * 0.5
    with torch.no_grad():
        out = module(feats)
    assert out.shape == (1, 400 // a.frame_multiple, tiny_cfg.text.hidden_size)
