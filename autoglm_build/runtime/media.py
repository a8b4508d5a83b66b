"""Images and speech from requests, through the vision and speech encoders.

Media arrive inline only (``data:`` URLs, base64 WAV): the server fetches nothing. Preprocessing is
the calibration path's (:mod:`autoglm_build.calibration`: GLM-4.1V's image processor, Whisper's
log-mel features), so served inputs match what the build calibrated and verified on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
from typing import ContextManager, Optional

from autoglm_build.config import BuildConfig
from autoglm_build.errors import UserError
from autoglm_build.runtime.backends import Backend
from autoglm_build.runtime.text import Segment


class MediaError(UserError):
    """A request's image or audio cannot be used; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("not valid base64", param) from None


def image_bytes(url: str, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL; any other URL is refused."""
    if not url.startswith("data:"):
        raise MediaError("only data: URLs are accepted (the server fetches nothing); "
                         "send the image inline as data:image/png;base64,...", param)
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise MediaError(f"expected data:image/<type>;base64,<data>, got '{header[:40]}'", param)
    if not payload:
        raise MediaError("the data: URL holds no image data", param)
    return decode_base64(payload, param)


def image_geometry(cfg: BuildConfig, capacity: Optional[int] = None):
    """The preprocessing bounds for served images: the config's, with ``max_pixels`` lowered where
    one image at it would not fit the vision engine's patch profile (``capacity`` patches)."""
    from autoglm_build.imaging import VisionGeometry

    top = cfg.patch_range()[2]
    return VisionGeometry.of(cfg.vision).within(min(top, capacity or top))


def media_key(kind: str, data: bytes) -> bytes:
    """The prefix cache's identity of a media part: a digest of the bytes the client sent (one server
    encodes the same bytes to the same embeddings), so two screenshots never share cached keys/values."""
    return hashlib.blake2b(data, digest_size=32, person=kind.encode()[:16]).digest()


def encode_image(backend: Backend, cfg: BuildConfig, data: bytes, param: str,
                 lock: Optional[ContextManager] = None) -> Segment:
    """The vision encoder's embeddings of one image at native resolution, with its token grid.

    ``lock`` is held around the encoder call only: decoding and preprocessing (about 165 ms for a
    1080x2400 PNG on the 2-core dev CPU; Pillow and numpy release the GIL) run concurrently across
    requests, while the encoder's one execution context serves one call at a time."""
    from autoglm_build.imaging import ImageError, open_image, pack, preprocess

    merge = cfg.vision.spatial_merge_size
    try:
        image = preprocess(open_image(io.BytesIO(data), "image"), image_geometry(cfg, backend.vision_patches))
    except ImageError as exc:
        raise MediaError(exc.message.split(": ", 1)[-1], param) from None
    feed = pack([image], merge)
    with lock or contextlib.nullcontext():
        embeds = backend.encode("vision", feed, "image_embeds")  # on the GPU with TensorRT
    return Segment(media="image", embeds=embeds, grid=image.merged_grid(merge), key=media_key("image", data))


def encode_audio(backend: Backend, cfg: BuildConfig, data: bytes, param: str,
                 lock: Optional[ContextManager] = None) -> Segment:
    """The speech encoder's embeddings of one 16 kHz mono WAV clip (at most 30 s); ``lock`` as for
    :func:`encode_image` (held around the encoder call only)."""
    from autoglm_build.calibration import SAMPLE_RATE, CalibrationDataError, load_wav, log_mel

    a = cfg.audio
    try:
        samples = load_wav(io.BytesIO(data), name="audio")
    except CalibrationDataError as exc:
        raise MediaError(wav_problem(data) or exc.message.split(": ", 1)[-1], param) from None
    seconds = len(samples) / SAMPLE_RATE
    if seconds > a.max_frames / 100:
        raise MediaError(f"{seconds:.1f} s of audio; the speech encoder takes at most {a.max_frames / 100:.0f} s",
                         param)
    features = log_mel(samples, a.num_mel_bins, a.frame_multiple, a.max_frames)
    with lock or contextlib.nullcontext():
        embeds = backend.encode("audio", {"input_features": features[None]}, "audio_embeds")[0]
    return Segment(media="audio", embeds=embeds, key=media_key("audio", data))


WAV_WANTED = "send 16 kHz mono 16-bit PCM WAV"
#: WAVE_FORMAT_* codes of encodings clients send by mistake
WAV_ENCODINGS = {2: "ADPCM", 3: "32-bit float", 6: "A-law", 7: "mu-law", 0x55: "MP3", 0xFFFE: "extensible-format"}


def wav_problem(data: bytes) -> Optional[str]:
    """What makes ``data`` unreadable as PCM WAV, read from its chunk headers (None: the headers are
    fine, so :func:`~autoglm_build.calibration.load_wav`'s own reason stands)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return f"not a WAV file (no RIFF/WAVE header); {WAV_WANTED}"
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        chunks.setdefault(data[pos:pos + 4], data[pos + 8:pos + 8 + min(size, 16)])
        pos += 8 + size + (size & 1)
    if len(chunks.get(b"fmt ", b"")) < 2:
        return f"truncated WAV data (no complete 'fmt ' chunk); {WAV_WANTED}"
    code = int.from_bytes(chunks[b"fmt "][:2], "little")
    if code != 1:
        return f"{WAV_ENCODINGS.get(code, f'format {code}')} WAV is not supported; {WAV_WANTED}"
    if b"data" not in chunks:
        return f"truncated WAV data (no 'data' chunk); {WAV_WANTED}"
    return None
