"""The packed native-resolution vision graph computes what transformers' Glm4vVisionModel computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_build.imaging import VisionGeometry, pack, patchify
from autoglm_build.modules import registry


def _images(cfg, sizes, seed=0):
    rng = np.random.default_rng(seed)
    geometry = VisionGeometry.of(cfg.vision)
    return [patchify(rng.standard_normal((3, h, w)).astype(np.float32), geometry) for h, w in sizes]


def _reference(module, images):
    """transformers' own packed forward (cu_seqlens over grid_thw)."""
    patches = torch.from_numpy(np.concatenate([img.pixel_values for img in images]))
    grid = torch.tensor([[1, img.rows, img.cols] for img in images])
    with torch.no_grad():
        return module.visual(patches, grid).pooler_output


def _ours(module, images, merge):
    feed = {k: torch.from_numpy(v) for k, v in pack(images, merge).items()}
    with torch.no_grad():
        return module(**feed)


@pytest.mark.parametrize("sizes", [
    [(112, 112)],        # the position table's own grid: interpolation is the identity
    [(644, 280)],        # a phone screenshot, portrait (1080x2400 at the tiny max_pixels)
    [(280, 644)],        # landscape
    [(196, 392)],        # 1:2, grid not a multiple of the table
    [(644, 280), (168, 224)],  # a pack of two images of different sizes
])
def test_matches_transformers_packed_forward(tiny_cfg, sizes):
    module = registry.get("vision").build(tiny_cfg)
    with torch.no_grad():  # a non-trivial position table (random init is tiny)
        module.visual.embeddings.position_embedding.weight.normal_(0, 1.0)
    images = _images(tiny_cfg, sizes)
    ours = _ours(module, images, tiny_cfg.vision.spatial_merge_size)
    ref = _reference(module, images)
    assert ours.shape == (sum(i.patches for i in images) // 4, tiny_cfg.text.hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_images_in_a_pack_do_not_see_each_other(tiny_cfg):
    module = registry.get("vision").build(tiny_cfg)
    first, second = _images(tiny_cfg, [(168, 224), (224, 112)])
    merge = tiny_cfg.vision.spatial_merge_size
    together = _ours(module, [first, second], merge)
    alone = _ours(module, [second], merge)
    torch.testing.assert_close(together[first.patches // 4:], alone, rtol=1e-5, atol=1e-6)


def test_position_term_is_transformers_bicubic_grid_sample(tiny_cfg):
    from autoglm_build.imaging import patch_positions
    from autoglm_build.modules.vision import interpolate_positions

    module = registry.get("vision").build(tiny_cfg)
    emb = module.visual.embeddings
    with torch.no_grad():
        emb.position_embedding.weight.normal_(0, 1.0)
    rows, cols = 10, 26
    pos = torch.from_numpy(patch_positions(rows, cols, 2))
    grid = torch.tensor([[0, rows, cols]]).expand(len(pos), 3)
    zeros = torch.zeros(len(pos), emb.embed_dim)
    with torch.no_grad():
        ref = emb(zeros, torch.tensor([len(pos)]), torch.tensor([[1, rows, cols]]), pos[:, 0], pos[:, 1])
        ours = interpolate_positions(emb.position_embedding.weight, 8, pos, grid)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, patches", [("autoglm-phone-tiny.yaml", [920, 920, 960]),
                                             ("autoglm-phone-9b.yaml", [12432, 12432, 6708])])
def test_verification_feeds_are_three_screenshot_shapes(config, patches):
    """verify's vision samples: a 1080x2400 portrait, a landscape screen and a half screen, each alone,
    at the processor's native resolution (the 9B config's 12,432 patches for the phone's screenshot)."""
    from pathlib import Path

    from autoglm_build.calibration import CalibrationData
    from autoglm_build.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / config)
    feeds = registry.get("vision").verification_feeds(cfg, CalibrationData.discover(Path(cfg.calibrate.data)))
    assert [len(f["pixel_values"]) for f in feeds] == patches
    grids = [tuple(f["patch_grid"][0, 1:]) for f in feeds]
    assert len(set(grids)) == 3 and all(f["patch_grid"][:, 0].max() == 0 for f in feeds)
    assert grids[0] == grids[1][::-1] and grids[0][0] > grids[0][1]  # portrait, then the same screen turned
