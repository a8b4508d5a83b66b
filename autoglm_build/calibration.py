"""Calibration data: read and check the shipped files, preprocess them with real processors.

- images (``images/*.jpg|png``, photos and phone screenshots): at native resolution, smart-resized,
  normalized and cut into patches as transformers' ``Glm4vImageProcessor`` does
  (:mod:`autoglm_build.imaging`).
- speech (``audio/*.wav``): 16 kHz mono PCM, turned into log-mel features by transformers'
  ``WhisperFeatureExtractor`` (``num_mel_bins`` bins), cut to the clip's length.
- prompts (``prompts.jsonl``): phone-agent instructions, tokenized by the config's tokenizer (a
  committed ``tokenizer.json`` for the tiny config, the checkpoint's own otherwise) in GLM's chat
  format.
- ``<module>/*.npz``: already preprocessed inputs named after the module's ONNX inputs.

Every problem is a :class:`CalibrationDataError` naming the file (exit code 2).
"""

from __future__ import annotations

import json
import math
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from autoglm_build.errors import UserError

SAMPLE_RATE = 16000
HOP = 160  # Whisper's 10 ms hop
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CHAT_TEMPLATE = "[gMASK]<sop><|user|>\n{prompt}<|assistant|>\n"


class CalibrationDataError(UserError):
    """A calibration file is missing, unreadable, empty, or of the wrong format."""


@dataclass
class CalibrationData:
    """The files of a calibration data directory, checked for presence (contents are read lazily)."""

    root: Path
    images: List[Path] = field(default_factory=list)
    audio: List[Path] = field(default_factory=list)
    prompts_file: Path = Path()
    npz: Dict[str, List[Path]] = field(default_factory=dict)

    @classmethod
    def discover(cls, root: Path) -> CalibrationData:
        root = Path(root)
        if not root.is_dir():
            raise CalibrationDataError(f"{root}: calibration data directory not found")
        images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        audio = sorted((root / "audio").glob("*.wav"))
        npz = {d.name: sorted(d.glob("*.npz")) for d in root.iterdir() if d.is_dir() and list(d.glob("*.npz"))}
        return cls(root=root, images=images, audio=audio, prompts_file=root / "prompts.jsonl", npz=npz)

    def require(self, what: str) -> List[Path]:
        files = {"images": self.images, "audio": self.audio}[what]
        if not files:
            raise CalibrationDataError(f"{self.root / what}: no calibration {what} found")
        return files


def check_calibration_data(root: Path, modules: List[str]) -> None:
    """Before any stage runs: ``calibrate.data`` is a directory holding what each module's
    calibration reads (vision: images, audio: WAV clips, embed and decoder: prompts.jsonl).

    Raises:
        CalibrationDataError: one line naming the directory or file.
    """
    root = Path(root)
    if not root.is_dir():
        raise CalibrationDataError(f"calibrate.data: {root}: calibration data directory not found",
                                   hint="a relative calibrate.data is resolved against the config file's directory")
    data = CalibrationData.discover(root)
    from autoglm_build.parts import split_name

    for module in (split_name(m)[0] for m in modules):  # a stage (vision.stage1) reads its module's data
        if module in ("vision", "audio"):
            data.require({"vision": "images", "audio": "audio"}[module])
        elif module in ("embed", "decoder") and not data.prompts_file.is_file():
            raise CalibrationDataError(f"{data.prompts_file}: calibration prompts not found (calibrate.data)")


def split(items: List, holdout: float) -> tuple:
    """(calibration, held-out): the last ``holdout`` fraction (at least one item) is held out."""
    n_hold = max(1, int(round(len(items) * holdout))) if len(items) > 1 else 0
    return items[: len(items) - n_hold], items[len(items) - n_hold:]


# ---- images ----------------------------------------------------------------------------------


def load_image_patches(path: Path, vision):
    """A calibration image at native resolution, as GLM-4.1V's processor prepares it
    (:func:`autoglm_build.imaging.preprocess`: smart resize within ``vision.min_pixels``/``max_pixels``,
    CLIP normalization, merge-window-major patches)."""
    from autoglm_build.imaging import ImageError, VisionGeometry, open_image, preprocess

    try:
        return preprocess(open_image(path, str(path)), VisionGeometry.of(vision))
    except ImageError as exc:
        raise CalibrationDataError(exc.message, hint=exc.hint) from None


# ---- speech ----------------------------------------------------------------------------------


def load_wav(source, name: Optional[str] = None) -> np.ndarray:
    """Mono 16 kHz 16-bit PCM samples as float32 in [-1, 1], from a path or a binary stream."""
    path = name or source
    try:
        with wave.open(source if hasattr(source, "read") else str(source), "rb") as fh:
            rate, channels, width, frames = fh.getframerate(), fh.getnchannels(), fh.getsampwidth(), fh.getnframes()
            raw = fh.readframes(frames)
    except (wave.Error, EOFError, OSError) as exc:
        raise CalibrationDataError(f"{path}: not a readable WAV file ({exc})") from None
    if rate != SAMPLE_RATE:
        raise CalibrationDataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} Hz",
                                   hint=f"resample, e.g. sox in.wav -r {SAMPLE_RATE} -c 1 -b 16 out.wav")
    if channels != 1 or width != 2:
        raise CalibrationDataError(f"{path}: {channels} channel(s) of {8 * width}-bit samples, expected mono 16-bit")
    if frames == 0:
        raise CalibrationDataError(f"{path}: no audio samples")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def log_mel(samples: np.ndarray, num_mel_bins: int, frame_multiple: int, max_frames: int) -> np.ndarray:
    """``(num_mel_bins, F)`` Whisper log-mel features; F covers the clip, rounded up to ``frame_multiple``."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    features = extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
    frames = min(max_frames, frame_multiple * math.ceil(len(samples) / HOP / frame_multiple))
    return features[:, :frames].astype(np.float32)


# ---- text ------------------------------------------------------------------------------------


def load_prompts(path: Path) -> List[str]:
    """The ``prompt`` of each JSON line; errors name the file and line."""
    if not path.is_file():
        raise CalibrationDataError(f"{path}: prompt file not found")
    prompts = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CalibrationDataError(f"{path}:{number}: field 'prompt' must be a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise CalibrationDataError(f"{path}: no prompts (the file is empty)")
    return prompts


def load_tokenizer(path: Path):
    """A Hugging Face ``tokenizers`` tokenizer from a ``tokenizer.json``."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse problem
        raise CalibrationDataError(f"{path}: not a readable tokenizer.json ({exc})") from None


def tokenizer_for(cfg) -> tuple:
    """(tokenizer, path): the config's ``tokenizer``, else the checkpoint's ``tokenizer.json``."""
    path = Path(cfg.tokenizer) if cfg.tokenizer else None
    if path is None and cfg.checkpoint:
        path = Path(cfg.checkpoint) / "tokenizer.json"
    if path is None:
        raise CalibrationDataError("no tokenizer: set `tokenizer:` in the config or pass --checkpoint with a "
                                   "tokenizer.json")
    if not path.is_file():
        raise CalibrationDataError(f"{path}: tokenizer file not found")
    return load_tokenizer(path), path


def check_prompts(cfg, modules: List[str]) -> None:
    """Before any stage runs, where embed or decoder tokenize the calibration prompts: the tokenizer
    is there and every prompt encodes within ``text.vocab_size`` (a missing or foreign tokenizer
    otherwise stops a run only at its samples stage, after export and optimize wrote their graphs).

    Raises:
        CalibrationDataError: one line naming the tokenizer or prompt file.
    """
    if {"embed", "decoder"} & set(modules):
        prompt_ids(cfg, CalibrationData.discover(Path(cfg.calibrate.data)))


def prompt_ids(cfg, data: CalibrationData) -> List[List[int]]:
    """The calibration prompts in GLM's chat format, as token ids."""
    tokenizer, path = tokenizer_for(cfg)
    return encode_prompts(tokenizer, load_prompts(data.prompts_file), cfg.text.vocab_size, path)


def encode_prompts(tokenizer, prompts: List[str], vocab_size: int, source: Path) -> List[List[int]]:
    ids = [tokenizer.encode(CHAT_TEMPLATE.format(prompt=p)).ids for p in prompts]
    top = max(max(x) for x in ids)
    if top >= vocab_size:
        raise CalibrationDataError(f"{source}: token id {top} is outside text.vocab_size {vocab_size}")
    return ids


def left_pad(batch: List[List[int]], pad_id: int = 0) -> tuple:
    """(ids, attention_mask) int64, left-padded to the longest sequence (as batched serving does)."""
    length = max(len(x) for x in batch)
    ids = np.full((len(batch), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), length), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return ids, mask


# ---- preprocessed tensors ----------------------------------------------------------------------


def load_npz(path: Path, input_names: List[str]) -> Dict[str, np.ndarray]:
    """Arrays named after ONNX inputs; pickled members, missing inputs and NaN/Inf are refused."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz without pickled members ({exc})") from None
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise CalibrationDataError(f"{path}: missing array(s) {', '.join(missing)}; has {', '.join(arrays)}")
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CalibrationDataError(f"{path}: array '{name}' contains NaN or Inf")
    return {n: arrays[n] for n in input_names}
