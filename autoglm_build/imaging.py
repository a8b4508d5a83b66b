"""Images at native resolution, as GLM-4.1V's image processor prepares them, without transformers.

GLM-4.1V reads an image at (nearly) its own size: ``smart_resize`` rounds height and width to
multiples of ``patch_size x spatial_merge_size`` (28 px) while keeping the pixel count within
``[min_pixels, max_pixels]``; the image is cut into 14x14 patches in merge-window-major order (the
4 patches of each 2x2 window consecutive), and every 4 patches become one image token. A
1080x2400 phone screenshot at ``max_pixels`` 5,000,000 is 1036x2352 px, 74x168 = 12,432 patches,
3,108 tokens.

This module is transformers' ``Glm4vImageProcessorPil`` (same arithmetic, same PIL bicubic resize,
same CLIP normalization and patch layout; the tests compare both) in numpy and Pillow only, so the
server preprocesses images on the GPU harness's Python 3.9 too. :func:`pack` lays several images
along one patch axis with what the vision graph needs per patch (its row and column, its image's
patch grid and the image's index, which keeps attention inside each image).

Decompression bombs are refused from the header, before any pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from autoglm_build.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: images whose header declares more pixels than this are refused before decoding (8K x 8K)
MAX_DECODE_PIXELS = 8192 * 8192


class ImageError(UserError):
    """An image cannot be read or is out of bounds; the message starts with what it is (file or field)."""


@dataclass(frozen=True)
class VisionGeometry:
    """What the preprocessing needs of ``vision:`` (a plain record, so callers without pydantic can build one)."""

    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 112 * 112
    max_pixels: int = 5_000_000

    @classmethod
    def of(cls, vision) -> VisionGeometry:
        """From a :class:`~autoglm_build.config.VisionConfig`."""
        return cls(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                   vision.min_pixels, vision.max_pixels)

    @property
    def factor(self) -> int:
        return self.patch_size * self.spatial_merge_size

    def max_patches(self) -> int:
        """The most patches one image can have at ``max_pixels`` (a multiple of the merge window)."""
        window = self.spatial_merge_size ** 2
        per_frame = self.max_pixels // self.temporal_patch_size
        return per_frame // (self.patch_size ** 2) // window * window

    def bounded_to(self, max_patches: int) -> VisionGeometry:
        """These bounds with ``max_pixels`` set to ``max_patches`` patches' worth (``min_pixels`` kept under it)."""
        pixels = max_patches * self.temporal_patch_size * self.patch_size ** 2
        return dataclasses.replace(self, max_pixels=pixels, min_pixels=min(self.min_pixels, pixels))

    def within(self, max_patches: int) -> VisionGeometry:
        """These bounds, lowered (:meth:`bounded_to`) only where an image could have more than ``max_patches``."""
        return self if self.max_patches() <= max_patches else self.bounded_to(max_patches)


def smart_resize(height: int, width: int, geometry: VisionGeometry) -> Tuple[int, int]:
    """transformers' ``glm4v smart_resize`` for a still image (``num_frames = temporal_patch_size``).

    Returns:
        (height, width) in pixels, multiples of ``patch_size x spatial_merge_size``.

    Raises:
        ImageError: an aspect ratio above 200, as transformers refuses it.
    """
    factor, frames = geometry.factor, geometry.temporal_patch_size
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = frames  # one still image is repeated temporal_patch_size times
    if t_bar * h_bar * w_bar > geometry.max_pixels:
        beta = math.sqrt((frames * height * width) / geometry.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < geometry.min_pixels:
        beta = math.sqrt(geometry.min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(height: int, width: int, geometry: VisionGeometry) -> int:
    """Image tokens an image of this size costs in the prompt."""
    h, w = smart_resize(height, width, geometry)
    return (h // geometry.factor) * (w // geometry.factor)


@dataclass(frozen=True)
class ImagePatches:
    """One preprocessed image: ``pixel_values`` (rows x cols, 3 x time x patch x patch) and its patch grid."""

    pixel_values: np.ndarray
    rows: int
    cols: int

    @property
    def patches(self) -> int:
        return self.rows * self.cols

    def merged_grid(self, merge: int) -> Tuple[int, int]:
        """(rows, cols) of image tokens: the layout GLM's 3-D rotary positions give them."""
        return self.rows // merge, self.cols // merge


def open_image(source, what: str, max_pixels: int = MAX_DECODE_PIXELS):
    """A decoded RGB ``PIL.Image`` from a path or a binary stream; the pixel count is checked first.

    Raises:
        ImageError: not an image, or its header declares more than ``max_pixels`` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:  # Pillow's own bound (2x its MAX_IMAGE_PIXELS) on the header
        raise ImageError(f"{what}: {exc.args[0].split(',')[0]} (refused before decoding)") from None
    except UnidentifiedImageError:  # its text names the stream object (an address) for a non-file source
        raise ImageError(f"{what}: not a readable image (format not recognized)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"{what}: {width}x{height} pixels exceeds the limit of {max_pixels} "
                             f"(refused before decoding)")
        try:
            return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{what}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def preprocess(image, geometry: VisionGeometry) -> ImagePatches:
    """``Glm4vImageProcessorPil``: smart resize (PIL bicubic), rescale, CLIP normalize, patchify.

    Args:
        image: a ``PIL.Image`` in RGB.
        geometry: patch and pixel bounds (``VisionGeometry.of(cfg.vision)``).
    """
    from PIL import Image

    height, width = smart_resize(image.height, image.width, geometry)
    resized = image.resize((width, height), Image.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    arr = ((arr - mean) / std).astype(np.float32)
    return patchify(arr, geometry)


def patchify(arr: np.ndarray, geometry: VisionGeometry) -> ImagePatches:
    """(C, H, W) normalized pixels -> the processor's patch layout (merge-window-major)."""
    p, m, t = geometry.patch_size, geometry.spatial_merge_size, geometry.temporal_patch_size
    channels, height, width = arr.shape
    rows, cols = height // p, width // p
    x = arr.reshape(channels, rows // m, m, p, cols // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return ImagePatches(np.ascontiguousarray(x.reshape(rows * cols, channels * t * p * p)), rows, cols)


def patch_positions(rows: int, cols: int, merge: int) -> np.ndarray:
    """(rows*cols, 2) int64 (row, col) of each patch in merge-window-major order
    (transformers' ``get_vision_position_ids``)."""
    h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    shape = (rows // merge, merge, cols // merge, merge)
    h = h.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    w = w.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([h, w], axis=1).astype(np.int64)


def pack(images: Sequence[ImagePatches], merge: int) -> Dict[str, np.ndarray]:
    """The vision graph's inputs for several images laid along one patch axis.

    Returns:
        ``pixel_values`` (patches, 3 x time x patch x patch) float32; ``patch_pos`` (patches, 2) int64, each patch's
        row and column; ``patch_grid`` (patches, 3) int64, the image's index, patch rows and patch cols.
    """
    pos, grid = [], []
    for index, img in enumerate(images):
        pos.append(patch_positions(img.rows, img.cols, merge))
        grid.append(np.tile(np.array([[index, img.rows, img.cols]], np.int64), (img.patches, 1)))
    return {"pixel_values": np.concatenate([img.pixel_values for img in images]).astype(np.float32, copy=False),
            "patch_pos": np.concatenate(pos), "patch_grid": np.concatenate(grid)}


def unpack(feed: Dict[str, np.ndarray]) -> List[ImagePatches]:
    """The images of a packed feed (inverse of :func:`pack`)."""
    grid, pixels = feed["patch_grid"], feed["pixel_values"]
    out, start = [], 0
    while start < len(grid):
        rows, cols = int(grid[start, 1]), int(grid[start, 2])
        out.append(ImagePatches(pixels[start:start + rows * cols], rows, cols))
        start += rows * cols
    return out


def group_within(images: Sequence[ImagePatches], per_group: int, max_patches: int) -> List[List[ImagePatches]]:
    """Consecutive images in groups of at most ``per_group`` images and ``max_patches`` patches
    (an engine call's bound); an image alone over the bound still gets a group of its own."""
    groups: List[List[ImagePatches]] = []
    for img in images:
        last = groups[-1] if groups else None
        if last and len(last) < per_group and sum(i.patches for i in last) + img.patches <= max_patches:
            last.append(img)
        else:
            groups.append([img])
    return groups


def unpatchify(img: ImagePatches, geometry: VisionGeometry) -> np.ndarray:
    """(C, H, W) normalized pixels of a preprocessed image (inverse of :func:`patchify`)."""
    p, m, t = geometry.patch_size, geometry.spatial_merge_size, geometry.temporal_patch_size
    x = img.pixel_values.reshape(img.rows // m, img.cols // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, img.rows * p, img.cols * p)


def shrink(img: ImagePatches, geometry: VisionGeometry, max_patches: int) -> ImagePatches:
    """The image resized (bicubic, on its normalized pixels) to at most ``max_patches`` patches."""
    from PIL import Image

    if img.patches <= max_patches:
        return img
    pixels = unpatchify(img, geometry)
    height, width = smart_resize(pixels.shape[1], pixels.shape[2], geometry.bounded_to(max_patches))
    channels = [np.asarray(Image.fromarray(c, mode="F").resize((width, height), Image.BICUBIC)) for c in pixels]
    return patchify(np.stack(channels).astype(np.float32), geometry)
