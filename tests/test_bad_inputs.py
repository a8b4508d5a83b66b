"""The bad-input suite (issue 16, item 4): each hostile input gives exit 2 and one line naming the file
or field, writes nothing (inside the workdir or outside it) and leaves no temp behind.

Every case sets up its input in a fresh directory (most on a copy of the shared ``trust_build``),
snapshots that directory, runs the CLI through its entry point, and compares the snapshot after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import pytest
from typer.testing import CliRunner

from autoglm_build.cli import app
from autoglm_build.manifest import Manifest, make_artifact
from tests.conftest import ROOT, write_config

runner = CliRunner()


class Env(NamedTuple):
    tmp: Path  # everything the case may touch lives here (outside files included)
    workdir: Path  # a copy of trust_build
    config: Path  # the trust config


class Case(NamedTuple):
    id: str
    setup: Callable[[Env], List[str]]  # prepares the input, returns the CLI arguments
    expect: str  # in the error line: the file or field named


# ---- helpers --------------------------------------------------------------------------------------


def snapshot(root: Path) -> Dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): type, mode and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[str(path.relative_to(root))] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), digest)
    return out


def record(workdir: Path, stage: str, module: str, files: Dict[str, str]) -> None:
    """Record ``files`` (relative path -> kind) as ``stage``/``module``'s outputs, as a build would."""
    manifest = Manifest.load(workdir)
    rec = manifest.record(stage, module)
    arts = [make_artifact(workdir, workdir / rel, kind, module, stage) for rel, kind in files.items()]
    manifest.put(rec, arts)
    manifest.save(workdir)


def data_copy(env: Env) -> Path:
    """A private copy of the shipped calibration data."""
    data = env.tmp / "data"
    shutil.copytree(ROOT / "calibration_data", data)
    return data


def config_with(env: Env, changes: dict) -> Path:
    return write_config(env.tmp / "changed.yaml", changes, base=env.config)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 1-bit pixels (a few dozen bytes on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def safetensors_file(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def embed_with_external_data(env: Env, location: str) -> None:
    """``onnx/embed.onnx`` rewritten with its weights in ``onnx/embed.onnx.data``, its location then
    set to ``location``, and recorded in the manifest (so only the location is wrong)."""
    import onnx

    onnx_dir = env.workdir / "onnx"
    model = onnx.load(str(onnx_dir / "embed.onnx"))
    onnx.save_model(model, str(onnx_dir / "embed.onnx"), save_as_external_data=True, location="embed.onnx.data",
                    size_threshold=1024)
    model = onnx.load(str(onnx_dir / "embed.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(onnx_dir / "embed.onnx"))
    record(env.workdir, "export", "embed", {"onnx/embed.onnx": "onnx", "onnx/embed.onnx.data": "onnx-data"})


def swap(env: Env, target: str, source: str) -> None:
    shutil.copyfile(env.workdir / source, env.workdir / target)


# ---- the cases ------------------------------------------------------------------------------------


def _config_not_utf8(env: Env) -> List[str]:
    bad = env.tmp / "latin1.yaml"
    bad.write_bytes(env.config.read_bytes().replace(b"name: ", b"name: caf\xe9-", 1))
    return ["export", "-c", str(bad), "-w", str(env.tmp / "new"), "-m", "embed"]


def _bench_batches(value: str) -> Callable[[Env], List[str]]:
    def setup(env: Env) -> List[str]:
        return ["bench", "-c", str(env.config), "-w", str(env.workdir), "-m", "embed", "--backends", "ort",
                "--min-time", "0", f"--batches={value}"]
    return setup


def _workdir_is_a_file(env: Env) -> List[str]:
    (env.tmp / "a-file").write_text("not a directory\n")
    return ["export", "-c", str(env.config), "-w", str(env.tmp / "a-file"), "-m", "embed"]


def _readonly_workdir(env: Env) -> List[str]:
    env.workdir.chmod(0o555)
    return ["export", "-c", str(env.config), "-w", str(env.workdir), "-m", "embed"]


def _checkpoint(header: dict, data: bytes, cut: int = 0) -> Callable[[Env], List[str]]:
    def setup(env: Env) -> List[str]:
        path = env.tmp / "ckpt" / "model.safetensors"
        safetensors_file(path, header, data)
        if cut:
            path.write_bytes(path.read_bytes()[:-cut])
        return ["export", "-c", str(env.config), "-w", str(env.tmp / "new"), "-m", "embed", "--checkpoint",
                str(path.parent)]
    return setup


_EMBED = "model.language_model.embed_tokens.weight"
_F32_4x4 = {_EMBED: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}


def _bomb_image(env: Env) -> List[str]:
    data = data_copy(env)
    (data / "images" / "000-bomb.png").write_bytes(png_header_only(20000, 20000))
    shutil.copyfile(env.workdir / "onnx" / "audio.onnx", env.workdir / "onnx" / "vision.onnx")  # a graph to name
    manifest = Manifest.load(env.workdir)
    rec = manifest.record("export", "audio").model_copy(update={"module": "vision"})
    manifest.put(rec, [make_artifact(env.workdir, env.workdir / "onnx" / "vision.onnx", "onnx", "vision", "export")])
    manifest.save(env.workdir)
    config = config_with(env, {"calibrate": {"data": str(data)}})  # another config: --force takes it
    return ["calibrate", "--int8", "--force", "-c", str(config), "-w", str(env.workdir), "-m", "vision"]


def _prompts_not_utf8(env: Env) -> List[str]:
    data = data_copy(env)
    (data / "prompts.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    config = config_with(env, {"calibrate": {"data": str(data)}})  # another config: --force takes it
    return ["calibrate", "--int8", "--force", "-c", str(config), "-w", str(env.workdir), "-m", "decoder"]


def _manifest(content: bytes) -> Callable[[Env], List[str]]:
    def setup(env: Env) -> List[str]:
        (env.workdir / "manifest.json").write_bytes(content)
        return ["export", "-c", str(env.config), "-w", str(env.workdir), "-m", "embed"]
    return setup


def _external(location: str) -> Callable[[Env], List[str]]:
    def setup(env: Env) -> List[str]:
        embed_with_external_data(env, location)
        return ["optimize", "--force", "-c", str(env.config), "-w", str(env.workdir), "-m", "embed"]
    return setup


def _external_symlink(env: Env) -> List[str]:
    embed_with_external_data(env, "embed.onnx.data")
    outside = env.tmp / "outside" / "embed.onnx.data"
    outside.parent.mkdir()
    shutil.move(str(env.workdir / "onnx" / "embed.onnx.data"), str(outside))
    (env.workdir / "onnx" / "embed.onnx.data").symlink_to(outside)
    return ["optimize", "--force", "-c", str(env.config), "-w", str(env.workdir), "-m", "embed"]


def _swapped(target: str, source: str, *command: str) -> Callable[[Env], List[str]]:
    def setup(env: Env) -> List[str]:
        swap(env, target, source)
        return [*command, "-c", str(env.config), "-w", str(env.workdir), "-m", "audio"]
    return setup


CASES = [
    Case("config-not-utf8", _config_not_utf8, "latin1.yaml: not UTF-8"),
    Case("bench-batches-0", _bench_batches("0"), "--batches: 0 is outside the batch profile"),
    Case("bench-batches-9", _bench_batches("9"), "--batches: 9 is outside the batch profile"),
    Case("bench-batches-minus-1", _bench_batches("-1"), "--batches: -1 is outside the batch profile"),
    Case("workdir-is-a-file", _workdir_is_a_file, "a-file is not a directory"),
    Case("workdir-read-only", _readonly_workdir, "workdir is not writable"),
    Case("safetensors-truncated", _checkpoint(_F32_4x4, b"\0" * 64, cut=10),
         f"model.safetensors: tensor '{_EMBED}': data_offsets"),
    Case("safetensors-offset-2**53", _checkpoint({_EMBED: {"dtype": "F32", "shape": [4, 4],
                                                           "data_offsets": [0, 2**53]}}, b"\0" * 64),
         f"model.safetensors: tensor '{_EMBED}': data_offsets: [0, 9007199254740992] run past the end"),
    Case("safetensors-unknown-dtype", _checkpoint({_EMBED: {"dtype": "Q7", "shape": [4, 4],
                                                            "data_offsets": [0, 64]}}, b"\0" * 64),
         f"model.safetensors: tensor '{_EMBED}': dtype: unknown dtype 'Q7'"),
    Case("calibration-image-bomb", _bomb_image, "000-bomb.png"),
    Case("prompts-not-utf8", _prompts_not_utf8, "prompts.jsonl: not UTF-8"),
    Case("manifest-binary", _manifest(b"\x89\xff\x00binary\x01"), "manifest.json: unreadable manifest"),
    Case("manifest-list", _manifest(b"[1, 2]\n"), "manifest.json: not a manifest (a JSON list"),
    Case("manifest-null", _manifest(b"null\n"), "manifest.json: not a manifest (a JSON null"),
    Case("external-data-dotdot", _external("../../etc/passwd"),
         "onnx/embed.onnx: external data: path '../../etc/passwd' leaves its directory"),
    Case("external-data-absolute", _external("/etc/passwd"),
         "onnx/embed.onnx: external data: path '/etc/passwd' is absolute"),
    Case("external-data-symlink-out", _external_symlink, "onnx/embed.onnx: external data: "),
    Case("swapped-int8-graph-verify", _swapped("int8/audio.onnx", "fp16/audio.onnx", "verify", "--precision", "int8"),
         "int8/audio.onnx: bytes differ from its manifest record"),
    Case("swapped-fp32-graph-verify", _swapped("optimized/audio.onnx", "optimized/embed.onnx", "verify"),
         "optimized/audio.onnx: bytes differ from its manifest record"),
    Case("swapped-fp32-graph-calibrate", _swapped("optimized/audio.onnx", "optimized/embed.onnx", "calibrate",
                                                  "--int8", "--force"),
         "optimized/audio.onnx: bytes differ from its manifest record"),
    Case("swapped-export-optimize", _swapped("onnx/audio.onnx", "onnx/embed.onnx", "optimize", "--force"),
         "onnx/audio.onnx: bytes differ from its manifest record"),
    Case("swapped-samples-verify", _swapped("samples/audio.npz", "samples/embed.npz", "verify", "--precision", "fp16"),
         "samples/audio.npz: bytes differ from its manifest record"),
]


def _deny_writes_under(monkeypatch, root: Path) -> None:
    """Root ignores directory modes; give it a non-root user's view of a read-only ``root``."""
    real_open, real_mkdir = os.open, os.mkdir

    def denied(path) -> bool:
        path = Path(os.fsdecode(path)).absolute()
        return (path == root or root in path.parents) and not root.stat().st_mode & stat.S_IWUSR

    def fake_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if denied(path) and not Path(os.fsdecode(path)).exists():
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_the_suite_has_the_cases_the_readme_counts():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"The bad-input suite: {len(CASES)} cases (tests/test_bad_inputs.py)" in readme
    assert len({c.id for c in CASES}) == len(CASES) == 22


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, trust_copy, trust_config, tmp_path, monkeypatch):
    env = Env(tmp_path, trust_copy, trust_config)
    args = case.setup(env)
    if case.id == "workdir-read-only" and os.geteuid() == 0:
        _deny_writes_under(monkeypatch, trust_copy)
    before = snapshot(tmp_path)
    try:
        result = runner.invoke(app, args)
        after = snapshot(tmp_path)
    finally:
        trust_copy.chmod(0o755)
    assert result.exit_code == 2, f"{case.id}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and case.expect in errors[0], result.stderr
    assert not result.stdout.strip()  # no result table for a refused input
    assert after == before  # nothing written, no temp left, nothing outside touched
