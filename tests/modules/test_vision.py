"""The batched vision wrapper computes what transformers' packed Glm4vVisionModel computes."""

from __future__ import annotations

import numpy as np
import torch

from autoglm_build.modules import registry


def test_matches_transformers_packed_path_on_processor_patches(tiny_cfg):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    v = tiny_cfg.vision
    module = registry.get("vision").build(tiny_cfg)
    module.finalize()
    images = torch.randn(3, 3, v.image_size, v.image_size)
    with torch.no_grad():
        ours = module(images)
    # transformers' own preprocessing layout and packed forward, one image after another
    patched = [Glm4vImageProcessorPil.patchify(None, img.numpy(), v.patch_size, v.spatial_merge_size,
                                               v.temporal_patch_size) for img in images]
    patches = torch.from_numpy(np.concatenate([p[0] for p in patched]))
    grid = torch.tensor([[1, gh, gw] for _, gh, gw in patched])
    with torch.no_grad():
        ref = module.visual(patches, grid).pooler_output
    assert ours.shape == (3, v.num_tokens, tiny_cfg.text.hidden_size)
    torch.testing.assert_close(ours.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)


def test_images_in_a_batch_are_independent(tiny_cfg):
    module = registry.get("vision").build(tiny_cfg)
    module.finalize()
    images = torch.randn(4, 3, tiny_cfg.vision.image_size, tiny_cfg.vision.image_size)
    with torch.no_grad():
        batched = module(images)
        single = module(images[2:3])
    torch.testing.assert_close(batched[2:3], single, rtol=1e-5, atol=1e-6)


def test_finalize_tracks_loaded_position_embedding(tiny_cfg):
    module = registry.get("vision").build(tiny_cfg)
    module.finalize()
    before = module.pos_embed.clone()
    with torch.no_grad():
        module.visual.embeddings.position_embedding.weight.mul_(2.0)
    module.finalize()
    assert not torch.allclose(before, module.pos_embed)
