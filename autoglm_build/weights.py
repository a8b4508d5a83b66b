"""Weights from a local safetensors checkpoint directory (Hugging Face layout).

Only safetensors is read: a directory with pickle weights (``.bin``, ``.pt``, ...) is refused, and
nothing here calls ``torch.load``. A sharded checkpoint's ``model.safetensors.index.json`` says which
file holds each tensor (its ``weight_map``, checked against the files' headers); without one, every
``*.safetensors`` file is read. Each module's state-dict prefix maps to candidate checkpoint
prefixes (``ModuleSpec.weight_prefixes``); the first candidate the checkpoint has is used.

Streaming: a module built under :func:`empty_parameters` has its parameters on the ``meta`` device
(no memory); :meth:`Checkpoint.load_into` checks every shape against the headers before reading
anything, then materializes each parameter from its tensor, one at a time (BF16/FP16 cast to the
module's FP32 per tensor, the file mapped only while that tensor is read). Peak memory is then the
module's FP32 weights plus one tensor, where building the module first and copying into it had
both the random FP32 init and the loaded weights' pages at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from autoglm_build.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on the JSON header
#: bytes per element of each safetensors dtype (the format's list)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class LoadReport:
    """What :meth:`Checkpoint.load_into` did."""

    loaded: int = 0
    prefixes: Dict[str, str] = field(default_factory=dict)  # module prefix -> checkpoint prefix used
    unused: List[str] = field(default_factory=list)  # checkpoint tensors under those prefixes not used


class Checkpoint:
    """A directory of ``*.safetensors`` files (one file or shards with an index).

    Args:
        directory: The checkpoint directory.

    Raises:
        CheckpointError: missing directory, no safetensors (pickle is refused), unreadable header.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint directory not found")
        self.files = sorted(self.directory.glob("*.safetensors"))
        if not self.files:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.directory}: only pickle weights here ({', '.join(pickles[:3])}); "
                    "autoglm-build reads safetensors only and never unpickles",
                    hint="convert once, in a trusted environment, with safetensors.torch.save_file",
                )
            raise CheckpointError(f"{self.directory}: no *.safetensors files in the checkpoint directory")
        index_path = self.directory / INDEX_NAME
        self.index: Dict[str, Path] = read_index(index_path) if index_path.is_file() else {}
        if self.index:
            self.files = sorted(set(self.index.values()))
        self.headers = {path: read_header(path) for path in self.files}
        if self.index:
            check_index(index_path, self.index, self.headers)
        else:
            for path, header in self.headers.items():
                for key in header:
                    if key != "__metadata__":
                        self.index[key] = path
        #: where a tensor's absence is reported: the index that lists the tensors, or the directory
        self.source = index_path if index_path.is_file() else self.directory

    def check_config(self, cfg: Any) -> None:
        """Refuse a build config that disagrees with the checkpoint's ``config.json``.

        Only fields that no weight shape reveals are checked here (rotary and norm settings); shape
        disagreements are caught tensor by tensor while loading. A checkpoint without a
        ``config.json`` is not checked.

        Raises:
            CheckpointError: naming the checkpoint field and the config field.
        """
        path = self.directory / "config.json"
        if not path.is_file():
            return
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        text = hf.get("text_config") or {}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        theirs = {
            "text.partial_rotary_factor": text.get("partial_rotary_factor", rope.get("partial_rotary_factor")),
            "text.rope_theta": text.get("rope_theta", rope.get("rope_theta")),
            "text.mrope_section": rope.get("mrope_section"),
            "text.rms_norm_eps": text.get("rms_norm_eps"),
            "vision.rms_norm_eps": (hf.get("vision_config") or {}).get("rms_norm_eps"),
        }
        for dotted, value in theirs.items():
            section, name = dotted.split(".")
            ours = getattr(getattr(cfg, section), name)
            if value is not None and _differs(value, ours):
                raise CheckpointError(
                    f"{path}: {section}_config {name} is {value}, the build config's {dotted} is {ours}; "
                    "the export would compute a different model",
                    hint=f"set {dotted}: {value} in the build config",
                )

    def fingerprint(self) -> str:
        """sha256 over each file's name, size and header (tensor names, dtypes, shapes, offsets).

        The tensor bytes are not hashed: a 9B checkpoint would cost a minute per build. Replacing
        a file changes its size or header in every realistic case; ``--force`` covers the rest.
        """
        digest = hashlib.sha256()
        if self.source.is_file():  # the index decides which file a tensor comes from
            digest.update(self.source.read_bytes())
        for path, header in self.headers.items():
            digest.update(f"{path.name}:{path.stat().st_size}:".encode())
            digest.update(json.dumps(header, sort_keys=True).encode())
        return digest.hexdigest()

    def load_into(
        self,
        module: Any,
        prefixes: Mapping[str, Tuple[str, ...]],
        label: str,
        ignore: Tuple[str, ...] = (),
    ) -> LoadReport:
        """Fill ``module``'s parameters and persistent buffers from this checkpoint, tensor by tensor.

        Every key and shape is checked against the files' headers before any tensor is read. A
        parameter on the ``meta`` device (:func:`empty_parameters`) is replaced by the tensor, cast to
        its dtype; any other is copied into.

        Args:
            module: A torch module whose state-dict keys start with the keys of ``prefixes``.
            prefixes: Module prefix -> candidate checkpoint prefixes, tried in order.
            label: The module's name, for messages.
            ignore: Checkpoint key suffixes (after the prefix) that belong to other modules.

        Returns:
            A :class:`LoadReport`.

        Raises:
            CheckpointError: a missing tensor or a shape mismatch, naming key and file.
        """
        state = module.state_dict(keep_vars=True)
        report = LoadReport()
        plan: Dict[str, str] = {}  # module key -> checkpoint key
        for mod_prefix, candidates in prefixes.items():
            keys = [k for k in state if k.startswith(mod_prefix)]
            ckpt_prefix = self._choose_prefix(keys, mod_prefix, candidates, label)
            report.prefixes[mod_prefix] = ckpt_prefix
            plan.update({key: ckpt_prefix + key[len(mod_prefix):] for key in keys})
            used = set(plan.values())
            report.unused += [
                k for k in self.index
                if k.startswith(ckpt_prefix) and k not in used and not k[len(ckpt_prefix):].startswith(ignore)
            ]
        for key, ckpt_key in plan.items():
            self._check_shape(ckpt_key, tuple(state[key].shape), label)
        for key, ckpt_key in plan.items():
            _put(module, key, self.tensor(ckpt_key, state[key].dtype))
            report.loaded += 1
        left = [name for name, p in module.named_parameters() if p.is_meta]
        if left:  # a spec whose weight_prefixes miss some of its parameters: a bug, not the user's
            raise RuntimeError(f"module '{label}': no checkpoint prefix covers {left[0]} ({len(left)} left empty)")
        return report

    def tensor(self, key: str, dtype: Any) -> Any:
        """One tensor, read alone and cast to ``dtype`` (a copy the caller owns: the file is unmapped
        once it returns, so its pages do not stay in this process's memory)."""
        from safetensors import safe_open

        with safe_open(str(self.index[key]), framework="pt") as fh:
            return fh.get_tensor(key).to(dtype, copy=True).contiguous()

    def _check_shape(self, ckpt_key: str, shape: Tuple[int, ...], label: str) -> None:
        path = self.index[ckpt_key]
        theirs = tuple(self.headers[path][ckpt_key]["shape"])
        if theirs != shape:
            raise CheckpointError(
                f"{path}: {ckpt_key}: shape {theirs} does not fit module '{label}' ({shape}); "
                "does the config match the checkpoint?"
            )

    def _choose_prefix(self, keys: List[str], mod_prefix: str, candidates: Tuple[str, ...], label: str) -> str:
        for cand in candidates:
            if keys and cand + keys[0][len(mod_prefix):] in self.index:
                missing = [cand + k[len(mod_prefix):] for k in keys if cand + k[len(mod_prefix):] not in self.index]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise CheckpointError(
                        f"{self.source}: tensor '{missing[0]}' for module '{label}' is missing{more}; "
                        "does the config's depth match the checkpoint?"
                    )
                return cand
        expected = " or ".join(f"'{c}{keys[0][len(mod_prefix):]}'" for c in candidates) if keys else "?"
        raise CheckpointError(f"{self.source}: no weights for module '{label}' (looked for {expected})")


def _differs(theirs: Any, ours: Any) -> bool:
    if isinstance(ours, (tuple, list)):
        return list(theirs) != list(ours)
    return abs(float(theirs) - float(ours)) > 1e-9 * max(1.0, abs(float(ours)))


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with every parameter on the ``meta`` device: shapes and dtypes, no memory
    (accelerate's ``init_empty_weights(include_buffers=False)``, without the dependency). Buffers
    stay real: the rotary tables are computed in ``__init__`` and are not in checkpoints.

    Each parameter is allocated as the module's ``__init__`` asks, then moved to ``meta`` as it is
    registered, before any init function writes it: ``torch.empty`` pages that nothing touched.
    """
    from torch import nn

    register = nn.Module.register_parameter

    def on_meta(self: Any, name: str, param: Any) -> None:
        register(self, name, param)
        if param is not None and not param.is_meta:
            param = self._parameters[name]
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _put(module: Any, key: str, value: Any) -> None:
    """Set parameter or buffer ``key`` of ``module`` to ``value``: a meta parameter is replaced (same
    ``requires_grad``), a real one or a buffer copied into."""
    import torch

    owner_name, _, name = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    current = owner._parameters.get(name) if name in owner._parameters else owner._buffers[name]
    if current.is_meta:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
    else:
        with torch.no_grad():
            current.copy_(value)


def read_index(path: Path) -> Dict[str, Path]:
    """``model.safetensors.index.json``'s ``weight_map``: tensor name -> shard path.

    Raises:
        CheckpointError: unreadable JSON, no ``weight_map`` object, a shard that is not there.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: weight_map: missing or empty (expected tensor name -> shard file)")
    out: Dict[str, Path] = {}
    for key, name in weight_map.items():
        shard = path.parent / name if isinstance(name, str) else None
        if shard is None or shard.parent != path.parent or not shard.is_file():
            raise CheckpointError(f"{path}: weight_map: '{key}' is in {name!r}, which is not a file of "
                                  f"{path.parent}", hint="the index and its shards must be copied together")
        out[key] = shard
    return out


def check_index(path: Path, index: Dict[str, Path], headers: Dict[Path, Dict[str, Any]]) -> None:
    """Every tensor the index lists is in the shard it names (checked on the headers only).

    Raises:
        CheckpointError: naming the index, the tensor and the shard.
    """
    for key, shard in index.items():
        if key not in headers[shard]:
            raise CheckpointError(f"{path}: weight_map: '{key}' is listed in {shard.name}, whose header has no "
                                  "such tensor", hint="the index and its shards must come from the same save")


def read_header(path: Path) -> Dict[str, Any]:
    """The JSON header of a safetensors file, read without loading any tensor.

    Raises:
        CheckpointError: the file is truncated or not safetensors.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            size = os.fstat(fh.fileno()).st_size
            if length > min(_HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {length} is implausible for a file of {size} bytes")
            header = json.loads(fh.read(length))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8 too
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    check_layout(path, header, size - 8 - length)
    return header


def check_layout(path: Path, header: Dict[str, Any], data_bytes: int) -> None:
    """Every tensor of a safetensors header has a known dtype and a shape whose bytes fit its
    ``data_offsets``, inside the file's data section: a truncated file, an offset past the end or an
    unknown dtype is refused here, naming the tensor, before safetensors reads anything.

    Raises:
        CheckpointError: naming the file and the tensor's field.
    """
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor '{key}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{where}: dtype: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where}: shape: {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets: {offsets!r} is not [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{where}: data_offsets: {offsets} run past the end of the file's "
                                  f"{data_bytes} data bytes (truncated?)")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise CheckpointError(f"{where}: data_offsets: {offsets} hold {offsets[1] - offsets[0]} bytes, "
                                  f"shape {shape} of {dtype} needs {count * DTYPE_BYTES[dtype]}")
