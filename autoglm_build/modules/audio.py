"""``audio``: a Whisper-style speech encoder and its projector into the decoder's width.

transformers' ``WhisperEncoder.forward`` insists on exactly ``2 * max_source_positions`` mel frames
(30 s). The export wrapper runs the same sub-modules (``conv1``, ``conv2``, ``embed_positions``,
``layers``, ``layer_norm``; same state-dict keys) over any frame count up to that bound, so clips
need not be padded to 30 s:

    mel (B, 128, F) -> conv1+GELU -> conv2(stride 2)+GELU -> + positions[:F/2] -> layers -> LayerNorm
                    -> stack k frames -> Linear -> GELU -> Linear -> (B, F/(2k), text hidden)
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.modules.base import Case, ModuleSpec, batched, npz_feeds, random_floats
from autoglm_build.modules.registry import register


def _torch_module():
    import torch
    from torch import nn
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    class AudioProjector(nn.Module):
        """Stacks ``stack`` encoder frames, then Linear-GELU-Linear into the decoder's width."""

        def __init__(self, d_model: int, stack: int, hidden: int, out: int) -> None:
            super().__init__()
            self.stack = stack
            self.linear_1 = nn.Linear(d_model * stack, hidden)
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(hidden, out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, d = x.shape
            x = x.reshape(b, n // self.stack, d * self.stack)
            return self.linear_2(self.act(self.linear_1(x)))

    class SpeechEncoder(nn.Module):
        """``input_features (B, mel, F)`` -> ``audio_embeds (B, F / (2 * stack), D_text)``."""

        def __init__(self, hf_config: Any, stack: int, hidden: int, out: int) -> None:
            super().__init__()
            self.encoder = WhisperEncoder(hf_config)
            self.projector = AudioProjector(hf_config.d_model, stack, hidden, out)

        def encode(self, features: torch.Tensor) -> torch.Tensor:
            enc = self.encoder
            x = nn.functional.gelu(enc.conv1(features))
            x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[: x.shape[1]]
            for layer in enc.layers:
                x = layer(x, None)
            return enc.layer_norm(x)

        def forward(self, input_features: torch.Tensor) -> torch.Tensor:
            return self.projector(self.encode(input_features))

    return SpeechEncoder


@register("audio", order=1)
class AudioSpec(ModuleSpec):
    """Whisper-large-v3-style encoder + projector: ``input_features`` -> ``audio_embeds``."""

    description = "Whisper-style speech encoder + projector"
    sections = ("audio", "text")
    weight_prefixes = {"encoder.": ("audio_encoder.",), "projector.": ("audio_projector.",)}

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        # Only the decoder's width reaches this module, not the rest of the text section.
        data = super().fingerprint_data(cfg)
        data["sections"]["text"] = {"hidden_size": cfg.text.hidden_size}
        return data

    def build(self, cfg: BuildConfig):
        import torch

        from autoglm_build.modules.hf_configs import whisper_config

        a = cfg.audio
        hidden = a.projector_hidden_size or cfg.text.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(cfg))
            module = _torch_module()(whisper_config(a), a.projector_stack, hidden, cfg.text.hidden_size)
        return module.eval()

    def input_names(self, cfg: BuildConfig) -> List[str]:
        return ["input_features"]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        return ["audio_embeds"]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        return {
            "input_features": {0: "batch", 2: "audio_frames"},
            "audio_embeds": {0: "batch", 1: "audio_tokens"},
        }

    def features(self, cfg: BuildConfig, rng: np.random.Generator, batch: int, frames: int) -> np.ndarray:
        # Whisper's log-mel features are clamped to [-1.5, 1.5]-ish after normalisation.
        return random_floats(rng, (batch, cfg.audio.num_mel_bins, frames), scale=0.5)

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        frames = cfg.audio.frame_multiple * 5
        return {"input_features": self.features(cfg, np.random.default_rng(0), 2, frames)}

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        for frames in cfg.export.audio_frames:
            for batch in cfg.export.batch_sizes:
                feats = self.features(cfg, rng, batch, frames)
                yield Case(label=f"{frames} frames", batch=batch, steps=({"input_features": feats},))

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        from autoglm_build.calibration import load_wav, log_mel, split

        a = cfg.audio
        clips = [log_mel(load_wav(p), a.num_mel_bins, a.frame_multiple, a.max_frames) for p in data.require("audio")]
        calib, held = split(clips, cfg.calibrate.holdout)

        def feeds(group):
            out = []
            for batch in batched(group, cfg.calibrate.batch_size):
                # Shorter clips are cut from the same 30 s-padded log-mel, so their tail is Whisper's
                # own padding.
                frames = max(c.shape[1] for c in batch)
                out.append({"input_features": np.stack([_pad_frames(c, frames) for c in batch])})
            return out

        return feeds(calib)[: cfg.calibrate.batches] + npz_feeds(self, cfg, data), feeds(held)


def _pad_frames(features: np.ndarray, frames: int) -> np.ndarray:
    """Extend log-mel features to ``frames`` with their own minimum (the log-mel of silence after
    Whisper's normalisation)."""
    if features.shape[1] >= frames:
        return features[:, :frames]
    pad = np.full((features.shape[0], frames - features.shape[1]), features.min(), dtype=features.dtype)
    return np.concatenate([features, pad], axis=1)
