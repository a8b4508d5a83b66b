"""``vision``: the GLM-4.1V vision tower over images at native resolution, packed along one axis.

The graph takes what transformers' ``Glm4vVisionModel(pixel_values, grid_thw)`` takes, with the
per-image bookkeeping that its Python loops derive from ``grid_thw`` given per patch instead, so
that one dynamic axis (``patches``) carries any mix of image sizes (:mod:`autoglm_build.imaging`
makes these inputs):

- ``pixel_values`` (patches, 3*2*14*14): ``Glm4vImageProcessor``'s patches, merge-window-major
- ``patch_pos`` (patches, 2) int64: each patch's row and column in its image's patch grid
- ``patch_grid`` (patches, 3) int64: the patch's image index, and that image's patch rows and cols

and computes, with the checkpoint's sub-modules (same state-dict keys)::

    patch_embed -> post_conv_layernorm -> + learned position table, bicubic-interpolated to each
    image's grid (grid_sample's arithmetic as 16 Gathers: TensorRT 8.5 has no GridSample)
    -> blocks (2-D rotary from patch_pos; attention masked to the patch's own image)
    -> post_layernorm -> 2x2 downsample conv -> merger -> image_embeds (patches / 4, text hidden)

Image tokens come out in the images' order, each image's in its merge-window order.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.modules.base import Case, ModuleSpec, StagePart, npz_feeds, random_floats
from autoglm_build.modules.registry import register
from autoglm_build.parts import HIDDEN, HIDDEN_IN, layer_ranges, part_name

#: image sizes (height, width) the validation cases cycle through: square, portrait, landscape
CASE_SIZES = ((112, 112), (224, 112), (112, 168), (168, 224))
#: the bicubic kernel's parameter in PyTorch's grid_sample
CUBIC_A = -0.75


def _cubic_weights(t):
    """PyTorch's ``get_cubic_upsample_coefficients``: the 4 tap weights at fractional offset ``t``."""
    a = CUBIC_A

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def interpolate_positions(table, side: int, patch_pos, patch_grid):
    """``Glm4vVisionEmbeddings``' position term: the (side*side, D) table sampled at each patch's centre.

    transformers calls ``grid_sample(bicubic, align_corners=False, padding_mode="border")``; here the
    same sample is 4x4 Gathers of clamped taps, weighted by the cubic kernel, so the graph is plain
    arithmetic that TensorRT 8.5 and later parse.
    """
    import torch

    pos = patch_pos.to(torch.float32)
    grid = patch_grid[:, 1:].to(torch.float32)
    normalized = (pos + 0.5) / grid * 2 - 1  # grid_sample's [-1, 1] coordinates (row, col)
    source = ((normalized + 1) * side - 1) / 2  # unnormalized, align_corners=False
    base = torch.floor(source)
    frac = source - base
    base = base.to(torch.int64)
    wy, wx = _cubic_weights(frac[:, 0:1]), _cubic_weights(frac[:, 1:2])
    out = None
    for i in range(4):
        row = torch.clamp(base[:, 0] + (i - 1), 0, side - 1)
        for j in range(4):
            col = torch.clamp(base[:, 1] + (j - 1), 0, side - 1)
            term = table[row * side + col] * (wy[i] * wx[j])
            out = term if out is None else out + term
    return out


def _torch_module():
    import torch
    from torch import nn
    from transformers.models.glm4v.modeling_glm4v import (
        Glm4vVisionModel,
        apply_rotary_pos_emb_vision,
        eager_attention_forward,
    )

    class VisionEncoder(nn.Module):
        """``Glm4vVisionModel`` over packed patches -> ``image_embeds (patches / merge^2, D_text)``.

        ``blocks`` (a stage of a staged tower) keeps only that range of blocks, at their global indices
        (state-dict keys stay the unstaged tower's); ``first`` False takes ``hidden_states_in`` (patches,
        hidden) instead of pixels and leaves out the patch embedding and positions; ``last`` False leaves
        out the final norm, downsample and merger and returns the hidden states. The whole tower is built
        first, so a stage's weights are the unstaged tower's.
        """

        def __init__(self, hf_config: Any, blocks: Optional[range] = None, first: bool = True,
                     last: bool = True) -> None:
            super().__init__()
            self.visual = Glm4vVisionModel(hf_config)
            self.merge = hf_config.spatial_merge_size
            self.out_hidden = hf_config.out_hidden_size
            self.table_side = hf_config.image_size // hf_config.patch_size
            visual = self.visual
            self.stage_blocks = list(blocks if blocks is not None else range(len(visual.blocks)))
            self.first, self.last = first, last
            for i in range(len(visual.blocks)):
                if i not in self.stage_blocks:
                    visual.blocks[i] = nn.Identity()
            if not first:
                visual.patch_embed = visual.post_conv_layernorm = visual.embeddings = None
            if not last:
                visual.post_layernorm = visual.downsample = visual.merger = None

        def attention(self, attn: nn.Module, x: torch.Tensor, rotary, mask: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, *rotary)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out, _ = eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
            return attn.proj(out.reshape(n, -1))

        @staticmethod
        def image_mask(patch_grid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            """(1, 1, N, N) additive mask: a patch attends to the patches of its own image only."""
            image = patch_grid[:, 0]
            same = image[:, None] == image[None, :]
            zero = torch.zeros((), dtype=dtype)
            return torch.where(same, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))[None, None]

        def embed(self, pixel_values: torch.Tensor, patch_pos: torch.Tensor, patch_grid: torch.Tensor):
            visual = self.visual
            h = visual.post_conv_layernorm(visual.patch_embed(pixel_values))
            return h + interpolate_positions(visual.embeddings.position_embedding.weight, self.table_side, patch_pos,
                                             patch_grid)

        def forward(self, pixel_values: torch.Tensor, patch_pos: Optional[torch.Tensor] = None,
                    patch_grid: Optional[torch.Tensor] = None):
            """``pixel_values``: the patches (the first stage, or the whole tower), else ``hidden_states_in``;
            the head stage (no block: the final norm, downsample and merger) takes nothing else."""
            visual = self.visual
            h = self.embed(pixel_values, patch_pos, patch_grid) if self.first else pixel_values
            if self.stage_blocks:
                # every stage derives the rotary angles and the image mask from the patch bookkeeping itself:
                # a few small ops, where handing them between stages would add two large tensors per call
                rotary = visual.rotary_pos_emb(h, patch_pos)
                mask = self.image_mask(patch_grid, h.dtype)
            for i in self.stage_blocks:
                blk = visual.blocks[i]
                h = h + self.attention(blk.attn, blk.norm1(h), rotary, mask)
                h = h + blk.mlp(blk.norm2(h))
            if not self.last:
                return h
            h = visual.post_layernorm(h)
            h = h.reshape(-1, self.merge, self.merge, h.shape[-1]).permute(0, 3, 1, 2)
            h = visual.downsample(h).reshape(-1, self.out_hidden)
            return visual.merger(h)

    return VisionEncoder


@register("vision", order=0)
class VisionSpec(ModuleSpec):
    """GLM-4.1V vision tower: packed native-resolution patches -> ``image_embeds (tokens, hidden)``."""

    description = "GLM-4.1V vision tower + 2x2 merger, native resolution"
    sections = ("vision",)
    weight_prefixes = {"visual.": ("model.visual.", "visual.")}
    batch_axis = "patches"

    def build(self, cfg: BuildConfig):
        return self._build(cfg, None, True, True)

    def _build(self, cfg: BuildConfig, blocks: Optional[range], first: bool, last: bool):
        import torch

        from autoglm_build.modules.hf_configs import vision_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(cfg))
            module = _torch_module()(vision_config(cfg.vision), blocks, first, last)
        return module.eval()

    def parts(self, cfg: BuildConfig) -> List[str]:
        """``vision``, or ``vision.stage0`` .. with ``vision.stages`` > 1 or ``vision.head_stage``
        (:mod:`autoglm_build.parts`)."""
        count = cfg.vision.parts
        return [self.name] if count == 1 else [part_name(self.name, k) for k in range(count)]

    def part(self, index: int) -> VisionStageSpec:
        """The spec of stage ``index`` (``vision.stage{index}``)."""
        return VisionStageSpec(index)

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        # `vision.stages` says how the tower is built, not what it computes: an unstaged tower keeps its
        # fingerprint (a stage adds its own range, VisionStageSpec.fingerprint_data)
        data = super().fingerprint_data(cfg)
        for key in ("stages", "head_stage"):
            data["sections"]["vision"].pop(key, None)
        return data

    def input_names(self, cfg: BuildConfig) -> List[str]:
        return ["pixel_values", "patch_pos", "patch_grid"]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        return ["image_embeds"]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        return {"pixel_values": {0: "patches"}, "patch_pos": {0: "patches"}, "patch_grid": {0: "patches"},
                "image_embeds": {0: "image_tokens"}}

    def random_images(self, cfg: BuildConfig, rng: np.random.Generator, sizes) -> Dict[str, np.ndarray]:
        """A packed feed of random-pixel images of the given (height, width) sizes."""
        from autoglm_build.imaging import VisionGeometry, pack, patchify

        geometry = VisionGeometry.of(cfg.vision)
        images = [patchify(random_floats(rng, (3, h, w)), geometry) for h, w in sizes]
        return pack(images, cfg.vision.spatial_merge_size)

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        # two images of different shapes: no axis specialises to one image or one grid
        return self.random_images(cfg, np.random.default_rng(0), CASE_SIZES[1:3])

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        """``batch`` images per call, of the sizes in ``CASE_SIZES`` (portrait, landscape, square)."""
        for batch in cfg.export.batch_sizes:
            sizes = [CASE_SIZES[k % len(CASE_SIZES)] for k in range(batch)]
            yield Case(label="native", batch=batch, steps=(self.random_images(cfg, rng, sizes),))

    def take_rows(self, cfg: BuildConfig, feed: Dict[str, np.ndarray], batch: int) -> Dict[str, np.ndarray]:
        """A pack of ``batch`` images made from ``feed``'s (repeating them when it has fewer), each
        shrunk where needed so that the pack fits one engine call (``engine.max_patches``)."""
        from autoglm_build.imaging import VisionGeometry, pack, shrink, unpack

        images = unpack(feed)
        window = cfg.vision.spatial_merge_size ** 2
        budget = cfg.patch_range()[2] // batch // window * window
        geometry = VisionGeometry.of(cfg.vision)
        chosen = [shrink(images[k % len(images)], geometry, budget) for k in range(batch)]
        return pack(chosen, cfg.vision.spatial_merge_size)

    def verification_feeds(self, cfg: BuildConfig, data) -> List[Dict[str, np.ndarray]]:
        """Three screenshot shapes, each alone in its feed: a 1080x2400 portrait as the agent sends it,
        a screen turned landscape (2400x1080), and a screen's upper half (1080x1200, a split-screen
        app); each smart-resized within ``vision.max_pixels`` (at 5,000,000: 12,432, 12,432 and 6,708
        patches; tiny: 46x20, 20x46 and 32x30 patch grids), so verify covers three aspect ratios."""
        from PIL import Image

        from autoglm_build.imaging import VisionGeometry, open_image, pack, preprocess

        screens = sorted(p for p in data.require("images") if p.name.startswith("screen_"))
        if not screens:
            return []
        geometry = VisionGeometry.of(cfg.vision)
        portrait = open_image(screens[0], str(screens[0]))
        landscape = open_image(screens[-1], str(screens[-1])).transpose(Image.Transpose.ROTATE_90)
        half = portrait.crop((0, 0, portrait.width, portrait.height // 2))
        return [pack([preprocess(img, geometry)], cfg.vision.spatial_merge_size)
                for img in (portrait, landscape, half)]

    def feed_items(self, feed: Dict[str, np.ndarray]) -> int:
        """Images in a packed feed."""
        grid = feed["patch_grid"]
        return int(grid[:, 0].max()) + 1 if len(grid) else 0

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        """Real photos and phone screenshots at native resolution, ``calibrate.batch_size`` per pack."""
        from autoglm_build.calibration import load_image_patches, split
        from autoglm_build.imaging import group_within, pack

        images = [load_image_patches(p, cfg.vision) for p in data.require("images")]
        calib, held = split(images, cfg.calibrate.holdout)
        merge, limit = cfg.vision.spatial_merge_size, cfg.patch_range()[2]

        def packs(group):
            return [pack(b, merge) for b in group_within(group, cfg.calibrate.batch_size, limit)]

        return packs(calib)[: cfg.calibrate.batches] + npz_feeds(self, cfg, data), packs(held)


Feed = Dict[str, np.ndarray]


class VisionStageSpec(StagePart, VisionSpec):
    """Stage ``index`` of the vision tower cut into ``vision.stages`` contiguous ranges of its blocks.

    Stage 0 takes the tower's inputs and adds the patch embedding, its norm and the interpolated
    positions before its blocks; later stages take the previous stage's ``hidden_states`` (patches,
    hidden) as ``hidden_states_in`` with ``patch_pos`` and ``patch_grid``, from which each stage derives
    its rotary angles and per-image attention mask itself; the last stage adds the final norm,
    downsample and merger and returns ``image_embeds``, the others return ``hidden_states``. Its weights
    are the whole tower's (same seed, or the same checkpoint tensors), its validation cases the tower's
    with the stage's inputs.

    With ``vision.head_stage`` the block stages all return ``hidden_states`` and one more stage (index
    ``vision.stages``) holds no block: ``hidden_states_in`` -> final norm -> 2x2 downsample -> merger ->
    ``image_embeds``, with no positions or mask (the merge windows are consecutive patches).
    """

    whole = VisionSpec
    unit = "blocks"

    def last(self, cfg: BuildConfig) -> bool:
        return self.index == cfg.vision.parts - 1

    def head(self, cfg: BuildConfig) -> bool:
        """The head stage (``vision.head_stage``): the final norm, downsample and merger, no block."""
        return cfg.vision.head_stage and self.index == cfg.vision.stages

    def blocks(self, cfg: BuildConfig) -> range:
        if self.index >= cfg.vision.parts:
            raise ValueError(f"{self.name}: the config's vision tower has {cfg.vision.parts} parts "
                             f"(vision.stages {cfg.vision.stages}, head_stage {cfg.vision.head_stage})")
        if self.head(cfg):
            return range(cfg.vision.depth, cfg.vision.depth)
        return layer_ranges(cfg.vision.depth, cfg.vision.stages)[self.index]

    def build(self, cfg: BuildConfig):
        # What the checkpoint holds beyond this stage's weights is the other stages': not "unused".
        others = [i for i in range(cfg.vision.depth) if i not in self.blocks(cfg)]
        ignore = tuple(f"blocks.{i}." for i in others)
        if not self.first():
            ignore += ("patch_embed.", "post_conv_layernorm.", "embeddings.")
        if not self.last(cfg):
            ignore += ("post_layernorm.", "downsample.", "merger.")
        self.checkpoint_ignore = VisionSpec.checkpoint_ignore + ignore
        return self._build(cfg, self.blocks(cfg), self.first(), self.last(cfg))

    def input_names(self, cfg: BuildConfig) -> List[str]:
        names = super().input_names(cfg)
        if self.head(cfg):
            return [HIDDEN_IN]
        return names if self.first() else [HIDDEN_IN] + names[1:]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        return super().output_names(cfg) if self.last(cfg) else [HIDDEN]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        axes = super().dynamic_axes(cfg)
        if not self.first():
            axes[HIDDEN_IN] = axes.pop("pixel_values")
        if self.head(cfg):
            axes = {name: axes[name] for name in (HIDDEN_IN, "image_embeds")}
        if not self.last(cfg):
            axes[HIDDEN] = {0: "patches"}
            del axes["image_embeds"]
        return axes

    def own_feed(self, cfg: BuildConfig, feed: Feed, rng: np.random.Generator) -> Feed:
        """A tower feed as this stage's: a later stage takes random activations (patches, hidden) in place
        of the pixels, as a decoder stage takes random ``hidden_states_in``."""
        if self.first():
            return feed
        out = {k: v for k, v in feed.items() if k != "pixel_values" and not self.head(cfg)}
        return {HIDDEN_IN: random_floats(rng, (len(feed["pixel_values"]), cfg.vision.hidden_size)), **out}

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        return self.own_feed(cfg, super().export_inputs(cfg), np.random.default_rng(1))

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        for case in super().cases(cfg, rng):
            yield Case(label=case.label, batch=case.batch, steps=tuple(self.own_feed(cfg, s, rng) for s in case.steps))

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        data = super().fingerprint_data(cfg)
        blocks = self.blocks(cfg)
        data.update(module=self.name, stages=cfg.vision.stages, blocks=[blocks.start, blocks.stop])
        if cfg.vision.head_stage and self.index >= cfg.vision.stages - 1:  # the stages it changes
            data.update(head_stage=True)
        return data

