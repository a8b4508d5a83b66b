"""``vision``: the GLM-4.1V vision tower over a batch of fixed-size images.

transformers' ``Glm4vVisionModel`` packs the patches of all images into one sequence and splits
attention by ``cu_seqlens`` at run time, which cannot carry a dynamic batch axis into an engine.
The export wrapper keeps every weight and sub-module of ``Glm4vVisionModel`` (same state-dict keys)
and runs the same math over ``(B, 3, H, W)``:

    pixels -> patch_embed (as a Conv2d, Glm4vImageProcessor's patch order) -> post_conv_layernorm
           -> + position embedding -> blocks (batched attention) -> post_layernorm
           -> 2x2 downsample conv -> merger -> (B, tokens, text hidden)

For a fixed image size the interpolated position embedding and the rotary cos/sin depend only on
weights, so :meth:`VisionEncoder.finalize` computes them once with transformers' own code after
the weights are loaded, and the graph carries them as constants (no GridSample in the engine).
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
    from transformers.models.glm4v.modeling_glm4v import (
        Glm4vVisionModel,
        apply_rotary_pos_emb_vision,
        eager_attention_forward,
    )
    from transformers.vision_utils import get_vision_position_ids

    class VisionEncoder(nn.Module):
        """``Glm4vVisionModel`` over ``pixel_values (B, C, H, W)`` -> ``image_embeds (B, N, D_text)``."""

        def __init__(self, hf_config: Any, image_size: int) -> None:
            super().__init__()
            self.visual = Glm4vVisionModel(hf_config)
            self.channels = hf_config.in_channels
            self.patch = hf_config.patch_size
            self.temporal = hf_config.temporal_patch_size
            self.merge = hf_config.spatial_merge_size
            self.grid = image_size // self.patch
            self.seq = self.grid * self.grid
            self.tokens = self.seq // (self.merge * self.merge)
            self.out_hidden = hf_config.out_hidden_size
            zeros = torch.zeros(self.seq, hf_config.hidden_size)
            head_dim = hf_config.hidden_size // hf_config.num_heads
            self.register_buffer("pos_embed", zeros, persistent=False)
            self.register_buffer("rope_cos", torch.zeros(self.seq, head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.zeros(self.seq, head_dim), persistent=False)

        @torch.no_grad()
        def finalize(self) -> None:
            """Weight-dependent constants for one image of the configured size (call after loading)."""
            grid_thw = torch.tensor([[1, self.grid, self.grid]])
            position_ids = get_vision_position_ids(grid_thw, self.merge)
            zeros = torch.zeros_like(self.pos_embed)
            lengths = torch.tensor([self.seq])
            self.pos_embed.copy_(
                self.visual.embeddings(zeros, lengths, grid_thw, position_ids[:, 0], position_ids[:, 1])
            )
            cos, sin = self.visual.rotary_pos_emb(zeros, position_ids)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

        def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
            """``Glm4vVisionPatchEmbed`` on ``Glm4vImageProcessor``'s patch layout, as one Conv2d.

            The processor repeats a still image ``temporal_patch_size`` times and the Conv3d's kernel
            spans those copies, so the Conv3d equals a Conv2d whose kernel is the Conv3d's summed
            over time. That keeps every tensor under TensorRT's 8 dimensions (the processor's own
            patchify needs 9) and reads each pixel once. Patches come out merge-window-major.
            """
            proj = self.visual.patch_embed.proj
            b, g, m = pixels.shape[0], self.grid // self.merge, self.merge
            x = nn.functional.conv2d(pixels, proj.weight.sum(dim=2), proj.bias, stride=self.patch)
            x = x.reshape(b, -1, g, m, g, m).permute(0, 2, 4, 3, 5, 1)
            return x.reshape(b * self.seq, -1)

        def attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            qkv = attn.qkv(x).reshape(b, s, 3, attn.num_heads, attn.head_dim).permute(2, 0, 1, 3, 4)
            q, k, v = qkv.unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, self.rope_cos, self.rope_sin)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out, _ = eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
            return attn.proj(out.reshape(b, s, -1))

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            visual = self.visual
            b = pixel_values.shape[0]
            h = visual.post_conv_layernorm(self.embed_patches(pixel_values))
            h = h.reshape(b, self.seq, -1) + self.pos_embed
            for blk in visual.blocks:
                h = h + self.attention(blk.attn, blk.norm1(h))
                h = h + blk.mlp(blk.norm2(h))
            h = visual.post_layernorm(h)
            h = h.reshape(-1, self.merge, self.merge, h.shape[-1]).permute(0, 3, 1, 2)
            h = visual.downsample(h).reshape(-1, self.out_hidden)
            return visual.merger(h).reshape(b, self.tokens, self.out_hidden)

    return VisionEncoder


@register("vision", order=0)
class VisionSpec(ModuleSpec):
    """GLM-4.1V vision tower: ``pixel_values (B,3,H,W)`` -> ``image_embeds (B, tokens, hidden)``."""

    description = "GLM-4.1V vision tower + 2x2 merger"
    sections = ("vision",)
    weight_prefixes = {"visual.": ("model.visual.", "visual.")}

    def build(self, cfg: BuildConfig):
        import torch

        from autoglm_build.modules.hf_configs import vision_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(cfg))
            module = _torch_module()(vision_config(cfg.vision), cfg.vision.image_size)
        return module.eval()

    def input_names(self, cfg: BuildConfig) -> List[str]:
        return ["pixel_values"]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        return ["image_embeds"]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        return {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}

    def pixel_shape(self, cfg: BuildConfig, batch: int) -> tuple:
        v = cfg.vision
        return (batch, v.in_channels, v.image_size, v.image_size)

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        return {"pixel_values": random_floats(np.random.default_rng(0), self.pixel_shape(cfg, 2))}

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        for batch in cfg.export.batch_sizes:
            pixels = random_floats(rng, self.pixel_shape(cfg, batch))
            yield Case(label=f"{cfg.vision.image_size}px", batch=batch, steps=({"pixel_values": pixels},))

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        from autoglm_build.calibration import load_image, split

        images = [load_image(p, cfg.vision.image_size) for p in data.require("images")]
        calib, held = split(images, cfg.calibrate.holdout)
        size = cfg.calibrate.batch_size
        feeds = [{"pixel_values": np.stack(b)} for b in batched(calib, size)][: cfg.calibrate.batches]
        return feeds + npz_feeds(self, cfg, data), [{"pixel_values": np.stack(b)} for b in batched(held, size)]
