"""``embed``: the decoder's token embedding table, exported on its own.

Kept apart from the decoder so that image and audio embeddings can be spliced in at their
placeholder positions before the decoder runs (the decoder takes ``inputs_embeds``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.modules.base import Case, ModuleSpec, batched, npz_feeds
from autoglm_build.modules.registry import register


def _torch_module():
    import torch
    from torch import nn

    class TokenEmbedding(nn.Module):
        """``input_ids (B, S)`` -> ``inputs_embeds (B, S, hidden)``; state-dict key ``embed_tokens``."""

        def __init__(self, vocab_size: int, hidden_size: int) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
            nn.init.normal_(self.embed_tokens.weight, std=0.02)  # transformers' initializer_range

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed_tokens(input_ids)

    return TokenEmbedding


@register("embed", order=2)
class EmbedSpec(ModuleSpec):
    """Token embedding table: ``input_ids`` -> ``inputs_embeds``."""

    description = "token embedding table"
    sections = ("text",)
    weight_prefixes = {"embed_tokens.": ("model.language_model.embed_tokens.", "model.embed_tokens.")}

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        data = super().fingerprint_data(cfg)
        t = cfg.text
        data["sections"]["text"] = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size}
        return data

    def build(self, cfg: BuildConfig):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(cfg))
            module = _torch_module()(cfg.text.vocab_size, cfg.text.hidden_size)
        return module.eval()

    def input_names(self, cfg: BuildConfig) -> List[str]:
        return ["input_ids"]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        return ["inputs_embeds"]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        return {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}

    def token_ids(self, cfg: BuildConfig, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
        return rng.integers(0, cfg.text.vocab_size, size=(batch, seq), dtype=np.int64)

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        return {"input_ids": self.token_ids(cfg, np.random.default_rng(0), 2, 5)}

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        for seq in cfg.export.decoder_seq_lens:
            for batch in cfg.export.batch_sizes:
                ids = self.token_ids(cfg, rng, batch, seq)
                yield Case(label=f"seq {seq}", batch=batch, steps=({"input_ids": ids},))

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        from autoglm_build.calibration import left_pad, prompt_ids, split

        calib, held = split(prompt_ids(cfg, data), cfg.calibrate.holdout)
        feeds = [{"input_ids": left_pad(b)[0]} for b in batched(calib, cfg.calibrate.batch_size)]
        held_feeds = [{"input_ids": left_pad(b)[0]} for b in batched(held, cfg.calibrate.batch_size)]
        return feeds[: cfg.calibrate.batches] + npz_feeds(self, cfg, data), held_feeds
