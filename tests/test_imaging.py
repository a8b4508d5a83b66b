"""Native-resolution preprocessing equals transformers' Glm4vImageProcessor."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from autoglm_build.imaging import (
    ImageError,
    VisionGeometry,
    group_within,
    image_tokens,
    open_image,
    pack,
    patchify,
    preprocess,
    shrink,
    smart_resize,
    unpack,
    unpatchify,
)

SIZES = [(2400, 1080), (1080, 2400), (3200, 1440), (1600, 720), (112, 112), (50, 900), (20, 30), (4000, 3000),
         (1334, 750), (333, 777)]


@pytest.mark.parametrize("max_pixels", [5_000_000, 401_408, 28 * 28 * 15000])
@pytest.mark.parametrize("height,width", SIZES)
def test_smart_resize_equals_transformers(height, width, max_pixels):
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as reference

    geometry = VisionGeometry(max_pixels=max_pixels)
    assert smart_resize(height, width, geometry) == reference(2, height, width, 2, 28, 112 * 112, max_pixels)


def test_a_phone_screenshot_costs_3108_tokens_at_5_megapixels():
    geometry = VisionGeometry(max_pixels=5_000_000)
    assert smart_resize(2400, 1080, geometry) == (2352, 1036)
    assert image_tokens(2400, 1080, geometry) == 3108
    assert geometry.max_patches() >= 12432


def test_the_tiny_config_reads_a_screenshot_with_at_least_4x_the_tokens_of_a_thumbnail(tiny_cfg):
    geometry = VisionGeometry.of(tiny_cfg.vision)
    assert image_tokens(2400, 1080, geometry) >= 4 * image_tokens(112, 112, geometry)


@pytest.mark.parametrize("size", [(1080, 2400), (2400, 1080), (300, 200)])
def test_preprocess_equals_transformers_processor(size):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    geometry = VisionGeometry(max_pixels=401_408)
    ours = preprocess(img, geometry)
    ref = Glm4vImageProcessorPil()(img, size={"shortest_edge": geometry.min_pixels,
                                              "longest_edge": geometry.max_pixels}, return_tensors="np")
    assert [1, ours.rows, ours.cols] == ref["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-5)


def test_pack_and_unpack_round_trip_and_patchify_inverts():
    geometry = VisionGeometry()
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in ((56, 84), (112, 28))]
    images = [patchify(a, geometry) for a in arrays]
    feed = pack(images, 2)
    assert feed["patch_grid"][:, 0].tolist() == [0] * 24 + [1] * 16
    back = unpack(feed)
    assert [(i.rows, i.cols) for i in back] == [(4, 6), (8, 2)]
    np.testing.assert_array_equal(unpatchify(back[0], geometry), arrays[0])


def test_shrink_and_grouping_respect_the_patch_bound():
    geometry = VisionGeometry(max_pixels=401_408)
    big = patchify(np.zeros((3, 644, 280), np.float32), geometry)
    small = shrink(big, geometry, 256)
    assert small.patches <= 256 and small.rows % 2 == 0 and small.cols % 2 == 0
    groups = group_within([big, small, small, small], per_group=3, max_patches=1024)
    assert [len(g) for g in groups] == [1, 3]


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(ImageError, match=r"exceeds (the )?limit of .* before decoding"):
        open_image(io.BytesIO(buffer.getvalue()), "image")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(io.BytesIO(b"not an image"), "image")
