"""A checkpoint with seeded random weights, laid out as the published GLM-4.1V-9B / AutoGLM-Phone-9B one.

What ``export --checkpoint`` reads at full size without the real weights: safetensors shards
(``model-00001-of-0000N.safetensors``, BF16 by default, one ``model.safetensors`` when everything
fits one shard) with ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), and
``config.json`` as transformers' ``Glm4vConfig`` writes it. Tensor names and shapes are not written
down here: they are read from transformers' ``Glm4vForConditionalGeneration`` built on the ``meta``
device (``model.visual.*``, ``model.language_model.*`` with the q/k/v biases, ``lm_head.weight``),
and from our speech module under the checkpoint prefixes its spec loads (``audio_encoder.*``,
``audio_projector.*``), so they cannot drift from what the loader and transformers expect.

Written tensor by tensor, in row chunks (:data:`CHUNK_ELEMENTS`): memory stays near one chunk
whatever the model's size (the 9B checkpoint is about 22 GB of BF16). safetensors' own writer
(``save_file``) takes a whole shard in memory, so the format's few bytes of framing are written here.

Safe to point at any directory: one that holds anything but a checkpoint this module wrote (its
shards carry ``"generator": "autoglm_build.layout"`` in their metadata) is refused, not overwritten,
and the checkpoint is written into a sibling temp directory that replaces ``out`` only once complete,
so an interrupted run leaves the old checkpoint (or nothing) there, never a mix.

Deterministic: each tensor's values come from its own generator, seeded by the seed and the
tensor's name, so they do not depend on the shard size, the order of writing or the other tensors;
the same seed gives the same bytes. Values: matrices, embeddings and biases ~ N(0, 0.02) (the
configs' ``initializer_range``), norm scales 1 + N(0, 0.02).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from autoglm_build.config import BuildConfig
from autoglm_build.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
#: in every shard's ``__metadata__``: what lets a later run tell its own output from a real checkpoint
GENERATOR = "autoglm_build.layout"
#: save_pretrained's max_shard_size "5GB"
DEFAULT_SHARD_MIB = 5e9 / 2**20
#: values generated and written at a time (64 MiB of FP32)
CHUNK_ELEMENTS = 1 << 24
STD = 0.02
DTYPES = {"bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16"), "fp32": ("F32", "float32")}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, shape, and what it is (``matrix``, ``bias`` or ``norm``)."""

    name: str
    shape: Tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def layout(cfg: BuildConfig) -> List[TensorSpec]:
    """Every tensor of the checkpoint for ``cfg``, in the model's module order (GLM-4.1V, then audio)."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    from autoglm_build.modules import registry
    from autoglm_build.modules.hf_configs import glm4v_config

    with torch.device("meta"):
        glm = Glm4vForConditionalGeneration(glm4v_config(cfg))
        audio = registry.get("audio").build(cfg) if "audio" in cfg.modules else None
    specs = list(_tensors(glm, {"": ""}))
    if audio is not None:
        prefixes = {ours: theirs[0] for ours, theirs in registry.get("audio").weight_prefixes.items()}
        specs += list(_tensors(audio, prefixes))
    return specs


def _tensors(model: Any, prefixes: Dict[str, str]) -> Iterator[TensorSpec]:
    """The persistent tensors of ``model`` under checkpoint names (module prefix -> checkpoint prefix)."""
    kinds = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            is_norm = "norm" in type(mod).__name__.lower()
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = (
                "norm" if is_norm and p_name == "weight" else "bias" if p_name == "bias" else "matrix")
    for key, value in model.state_dict().items():
        ours = next((p for p in prefixes if key.startswith(p)), None)
        if ours is None:
            continue
        yield TensorSpec(prefixes[ours] + key[len(ours):], tuple(value.shape), kinds.get(key, "matrix"))


def shard_plan(specs: List[TensorSpec], shard_bytes: int, itemsize: int) -> List[List[TensorSpec]]:
    """Tensors into shards of at most ``shard_bytes`` (a bigger tensor alone), in order, as
    save_pretrained fills them."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def chunks(spec: TensorSpec, seed: int, dtype: Any) -> Iterator[Any]:
    """The tensor's values in ``dtype``, flat, :data:`CHUNK_ELEMENTS` at a time."""
    import torch

    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    for start in range(0, spec.numel, CHUNK_ELEMENTS):
        values = torch.randn(min(CHUNK_ELEMENTS, spec.numel - start), generator=gen) * STD
        if spec.kind == "norm":
            values += 1.0
        yield values.to(dtype)


def write_shard(path: Path, specs: List[TensorSpec], seed: int, dtype: str) -> int:
    """One safetensors file: header (sorted keys, padded to 8 bytes with spaces as safetensors pads
    it), then each tensor's bytes in name order. Written to a temp file, then moved into place.
    Returns the tensor bytes written."""
    import torch

    tag, torch_name = DTYPES[dtype]
    torch_dtype = getattr(torch, torch_name)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: Dict[str, Any] = {"__metadata__": {"format": "pt", "generator": GENERATOR}}
    offset = 0
    ordered = sorted(specs, key=lambda s: s.name)
    for spec in ordered:
        end = offset + spec.numel * itemsize
        header[spec.name] = {"dtype": tag, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for spec in ordered:
            for values in chunks(spec, seed, torch_dtype):
                fh.write(values.view(torch.int16 if itemsize == 2 else torch.int32).numpy())
    os.replace(tmp, path)
    return offset


def hf_config_json(cfg: BuildConfig, dtype: str) -> str:
    """``config.json`` as transformers writes it for ``Glm4vForConditionalGeneration`` in ``dtype``."""
    import torch

    from autoglm_build.modules.hf_configs import glm4v_config

    hf = glm4v_config(cfg)
    hf.architectures = ["Glm4vForConditionalGeneration"]
    hf.dtype = getattr(torch, DTYPES[dtype][1])
    return hf.to_json_string()


def write_checkpoint(cfg: BuildConfig, out: Path, dtype: str = "bf16", shard_mib: float = DEFAULT_SHARD_MIB,
                     seed: int = 0, progress: Optional[Callable[[str, int], None]] = None,
                     workers: int = 1) -> Dict[str, Any]:
    """Write the checkpoint for ``cfg`` into ``out``: created if missing, replaced whole if it holds
    an earlier output of this function, refused otherwise.

    Args:
        cfg: The build config whose sizes the checkpoint takes.
        out: The checkpoint directory.
        dtype: ``bf16`` (the published checkpoint's), ``fp16`` or ``fp32``.
        shard_mib: Largest shard, MiB (a tensor bigger than that gets a shard of its own).
        seed: The values' seed.
        progress: Called with each shard's file name and tensor bytes once it is written.
        workers: Shards written at once (threads); the bytes do not depend on it.

    Returns:
        ``{"files": [names], "tensors": n, "parameters": n, "total_size": bytes}``.

    Raises:
        UserError: ``out`` is a file or a directory holding anything else (left untouched), or a
            write failed (nothing is left at ``out`` but what was there before).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tmp = None
    try:
        check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        summary = _write_files(cfg, tmp, dtype, shard_mib, seed, progress, workers)
        _swap_in(tmp, out)
        tmp = None
    except OSError as exc:
        raise UserError(f"{exc.filename or out}: cannot write the checkpoint ({exc.strerror or exc})",
                        hint=f"{out} is as it was") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def check_replaceable(out: Path) -> None:
    """Raise :class:`UserError` unless ``out`` is missing, empty, or only what :func:`write_checkpoint`
    writes (``config.json``, the index, shards marked with :data:`GENERATOR`)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory", hint="choose a new or empty directory")
    refuse = f"{out}: not empty and not written by {GENERATOR}; refusing to replace it"
    hint = "choose a new or empty directory"
    for path in out.iterdir():
        if path.name in ("config.json", INDEX_NAME):
            continue
        if not (path.name.startswith("model") and path.name.endswith(".safetensors")) or not _ours(path):
            raise UserError(f"{refuse} ({path.name})", hint=hint)


def _ours(shard: Path) -> bool:
    from autoglm_build.weights import read_header

    try:
        meta = read_header(shard).get("__metadata__")
    except UserError:
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR


def _write_files(cfg: BuildConfig, out: Path, dtype: str, shard_mib: float, seed: int,
                 progress: Optional[Callable[[str, int], None]], workers: int = 1) -> Dict[str, Any]:
    """The checkpoint's files into the empty directory ``out``."""
    import torch

    itemsize = torch.empty((), dtype=getattr(torch, DTYPES[dtype][1])).element_size()
    specs = layout(cfg)
    shards = shard_plan(specs, int(shard_mib * 2**20), itemsize)
    names = shard_names(len(shards))

    def one(name: str, group: List[TensorSpec]) -> int:
        written = write_shard(out / name, group, seed, dtype)
        if progress:
            progress(name, written)
        return written

    if workers > 1:  # shards in parallel threads (torch's randn and file writes release the GIL): same bytes
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            total = sum(pool.map(one, names, shards))
    else:
        total = sum(one(name, group) for name, group in zip(names, shards))
    (out / "config.json").write_text(hf_config_json(cfg, dtype), encoding="utf-8")
    if len(names) > 1:
        weight_map = {s.name: name for name, group in zip(names, shards) for s in group}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"files": names, "tensors": len(specs), "parameters": sum(s.numel for s in specs), "total_size": total}


def _swap_in(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``; an existing ``out`` (already checked to be ours) is moved aside
    first and removed after, so ``out`` never holds a mix of two runs."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
