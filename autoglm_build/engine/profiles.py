"""Optimization profiles [min, opt, max] per module input, from the graph's named dynamic axes.

Every dynamic axis of our graphs has a name (``batch``, ``seq``, ``past_seq``, ``total_seq``,
``audio_frames``, the vision tower's packed ``patches``); the ranges come from ``engine:`` in the
config. A graph with a KV cache gets
two profiles, so that the cache is bounded by ``engine.context`` exactly and related axes stay
consistent at min, opt and max (``total_seq = past_seq + seq``, which TensorRT checks through the
Concat of cache and new keys):

- profile 0, prefill: ``batch`` 1..prefill_batch (default the max batch), ``seq`` 1..prefill_chunk,
  ``past_seq`` 0..context-1 (the chunks of a long prompt after the first, and a prompt after a cached
  prefix), ``total_seq`` their sum (the scheduler keeps a request's total within the context; the
  profile's bound is the sum of the two bounds)
- profile 1, decode: ``seq`` 1, ``past_seq`` 1..context-1, ``total_seq`` = ``past_seq`` + 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from autoglm_build.config import BuildConfig
from autoglm_build.errors import UserError

Shape = Tuple[int, ...]


PROFILE_NAMES = ("prefill", "decode")


def axis_ranges(cfg: BuildConfig, max_batch: int, opt_batch: int, profile: int = 0,
                cached: bool = False) -> Dict[str, Tuple[int, int, int]]:
    """[min, opt, max] of each named axis in ``profile`` (0 prefill, 1 decode; ``cached``: a graph with a
    KV cache, whose prefill profile takes at most ``engine.prefill_batch`` rows)."""
    g = cfg.engine
    if cached and profile == 0:
        rows = min(g.prefill_batch or max_batch, max_batch)
        max_batch, opt_batch = rows, min(opt_batch, rows)
    ranges = {
        "batch": (1, opt_batch, max_batch),
        "audio_frames": (cfg.audio.frame_multiple, g.opt_audio_frames, cfg.audio.max_frames),
        "patches": cfg.patch_range(),
    }
    if profile == 0:
        chunk = g.prefill_tokens
        ranges.update(seq=(1, g.opt_seq, chunk), past_seq=(0, 0, g.context - 1),
                      total_seq=(1, g.opt_seq, g.context - 1 + chunk))
    else:
        opt = max(1, min(g.opt_past, g.context - 1))
        ranges.update(seq=(1, 1, 1), past_seq=(1, opt, g.context - 1), total_seq=(2, opt + 1, g.context))
    return ranges


def profile_count(onnx_path: Path) -> int:
    """2 for a graph with a KV cache (prefill and decode profiles), else 1."""
    return 2 if any("past_seq" in dims for dims in input_dims(onnx_path).values()) else 1


def input_dims(onnx_path: Path) -> Dict[str, List]:
    """Each graph input's dims: ints, or the axis name for dynamic ones (no weights loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input if i.name not in initializers
    }


def profiles(cfg: BuildConfig, onnx_path: Path, max_batch: int, opt_batch: int) -> List[Dict[str, Tuple]]:
    """Every optimization profile of the module's engine, in order."""
    return [profile_shapes(cfg, onnx_path, max_batch, opt_batch, k) for k in range(profile_count(onnx_path))]


def profile_shapes(cfg: BuildConfig, onnx_path: Path, max_batch: int, opt_batch: int,
                   profile: int = 0) -> Dict[str, Tuple[Shape, Shape, Shape]]:
    """``{input: (min, opt, max)}`` for one TensorRT optimization profile.

    Raises:
        UserError: an input has a dynamic axis with no configured range.
    """
    dims_of = input_dims(onnx_path)
    cached = any("past_seq" in dims for dims in dims_of.values())
    ranges = axis_ranges(cfg, max_batch, opt_batch, profile, cached)
    shapes = {}
    for name, dims in dims_of.items():
        triple = []
        for k in range(3):
            shape = []
            for d in dims:
                if isinstance(d, str):
                    if d not in ranges:
                        raise UserError(f"{onnx_path}: input '{name}' has dynamic axis '{d}' with no engine range; "
                                        f"known: {', '.join(ranges)}")
                    shape.append(ranges[d][k])
                else:
                    shape.append(d)
            triple.append(tuple(shape))
        shapes[name] = (triple[0], triple[1], triple[2])
    return shapes
