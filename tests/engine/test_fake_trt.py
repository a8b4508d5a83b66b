"""The engine path on TensorRT 8.5, 10.13 and 11.1 API surfaces, without a TensorRT.

A fake ``tensorrt`` per surface (tests/engine/fake_trt: every class and enum value the version binds,
read from NVIDIA/TensorRT's sources, and nothing else) runs under the real Polygraphy wheels:
``autoglm-build engine`` (the build child), ``verify``'s engine path, ``TensorRTBackend.device_call``
and ``polygraphy inspect model``. The supported pairs build and verify; the pair known not to work
exits 4 with one line. ``AUTOGLM_BUILD_FAKE_TRT_WORKDIR`` reuses a workdir that already holds the
tiny config's vision graphs and samples (``autoglm-build run -m vision``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.engine.fake_trt import harness

pytestmark = pytest.mark.slow
SUPPORTED = [("8.5.3", "0.49.26"), ("10.13.0", "0.53.6"), ("11.1.0", "0.53.6")]  # (TensorRT, Polygraphy)
STRONGLY_TYPED = {"8.5.3": False, "10.13.0": True, "11.1.0": True}


@pytest.fixture(scope="module")
def vision_build(tmp_path_factory) -> Path:
    """The tiny config's vision graphs (fp32, fp16, int8) and verification samples."""
    given = os.environ.get("AUTOGLM_BUILD_FAKE_TRT_WORKDIR")
    if given:
        return Path(given)
    workdir = tmp_path_factory.mktemp("fake-trt") / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_TRT")}
    out = harness.run(["-m", "autoglm_build", "run", "-c", str(TINY), "-w", str(workdir), "-m", "vision", "-q"],
                      env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def decoder_build(tmp_path_factory) -> Path:
    """The tiny config's embed and decoder graphs (fp32, fp16, int8) and verification samples."""
    workdir = tmp_path_factory.mktemp("fake-trt-decoder") / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_TRT")}
    out = harness.run(["-m", "autoglm_build", "run", "-c", str(TINY), "-w", str(workdir), "-m", "embed", "-m",
                       "decoder", "-q"], env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_verify_strict_catches_a_broken_int8_engine(decoder_build, tmp_path):
    """Issue 16: an INT8 decoder engine whose logits carry a random bias of +-9 % of max|logit| (a
    broken build, ``FAKE_TRT_OUTPUT_BIAS``) fails ``verify --strict`` against its own INT8 graph; the
    faithful build of the same graph passes. Compared with FP32 at the old INT8 tolerance
    (0.15 max|ref|) the broken engine passed."""
    workdir = tmp_path / "w"
    shutil.copytree(decoder_build, workdir)
    env = harness.environment("10.13.0", "0.53.6", tmp_path / "calls.jsonl")
    args = ["-w", str(workdir), "-m", "decoder", "--precision", "int8"]
    built = harness.run(["-m", "autoglm_build", "engine", *args], env)
    assert built.returncode == 0, built.stderr[-3000:]
    verify = ["-m", "autoglm_build", "verify", *args, "--backend", "tensorrt", "--strict", "--json"]
    faithful = harness.run(verify, env)
    assert faithful.returncode == 0, faithful.stderr[-3000:]
    rows = json.loads(faithful.stdout)["rows"]
    assert {(r["output"], r["reference"]) for r in rows} >= {("logits", "int8 graph"), ("present_key", "int8 graph")}
    assert all(r["passed"] and r["backend"] == "tensorrt" for r in rows)
    broken = harness.run(verify, {**env, "FAKE_TRT_OUTPUT_BIAS": f"logits:{0.09}"})
    assert broken.returncode == 3, broken.stderr[-3000:]
    failed = {(r["output"], r["batch"]) for r in json.loads(broken.stdout)["rows"] if not r["passed"]}
    assert failed == {("logits", b) for b in (1, 4, 8)}, failed
    assert "Traceback" not in broken.stderr


def _drive(vision_build: Path, tmp_path: Path, trt: str, polygraphy: str):
    workdir = tmp_path / "w"
    shutil.copytree(vision_build, workdir)
    log = tmp_path / "calls.jsonl"
    env = harness.environment(trt, polygraphy, log)
    out = harness.run([str(Path(harness.__file__).with_name("drive.py")), str(TINY), str(workdir), "vision"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), harness.calls(log)


@pytest.mark.parametrize("trt, polygraphy", SUPPORTED)
def test_supported_pair_builds_verifies_binds_and_inspects(vision_build, tmp_path, trt, polygraphy):
    results, calls = _drive(vision_build, tmp_path, trt, polygraphy)
    for precision in ("fp16", "int8"):
        built = results[f"engine-{precision}"]
        assert built["exit_code"] == 0, built
        mode = "strongly typed" if STRONGLY_TYPED[trt] else "flag mode"
        assert f"building ({mode}, TensorRT {trt}" in built["stderr"]
        if trt != "8.5.3":  # TensorRT >= 10's progress monitor reaches the stage's status line
            assert "Building engine 2/2" in built["stderr"], built["stderr"]
    verify = results["verify"]
    assert verify["exit_code"] == 0, verify
    report = json.loads(verify["stdout"])
    engine_rows = [r for r in report["rows"] if r["backend"] == "tensorrt"]
    assert {(r["precision"], r["batch"]) for r in engine_rows} == {(p, b) for p in ("fp16", "int8") for b in (1, 4, 8)}
    assert report["passed"] and report["engines_checked"]
    bound = results["device_call"]
    assert bound.get("outputs") == ["image_embeds"] and bound["max_diff"] == 0.0, bound
    inspected = results["inspect"]
    assert inspected.get("exit_code") == 0 and "pixel_values" in inspected["stdout"], inspected
    assert "min=(4, 1176)" in inspected["stdout"]  # the patch profile: one merge window at least
    _check_builder_calls(trt, calls)


def _check_builder_calls(trt: str, calls):
    """What reached the builder: strongly typed networks carry no precision flags; flag mode sets
    FP16 (and INT8 for Q/DQ graphs); cuBLAS tactics only where TensorRT has them."""
    networks = [c["args"][0] for c in calls if c["call"] == "Builder.create_network"]
    builds = [c["args"][0] for c in calls if c["call"] == "Builder.build_serialized_network"]
    assert len(networks) == 2 and len(builds) == 2, calls
    if STRONGLY_TYPED[trt]:
        assert all(not set(flags) & {"FP16", "INT8"} for flags in builds), builds
        assert all(n != 0 for n in networks)  # the STRONGLY_TYPED creation flag
    else:
        assert builds == [["FP16"], ["FP16", "INT8"]], builds
    tactics = [c["args"][0] for c in calls if c["call"] == "IBuilderConfig.set_tactic_sources"]
    assert tactics == ([] if trt.startswith("11.") else [3]), tactics  # CUBLAS | CUBLAS_LT on <= 10


def test_unsupported_pair_exits_4_with_one_line(vision_build, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(vision_build, workdir)
    env = harness.environment("11.1.0", "0.49.26", tmp_path / "calls.jsonl")
    out = harness.run(["-m", "autoglm_build", "engine", "-c", str(TINY), "-w", str(workdir), "-m", "vision"], env)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 4, out.stderr[-2000:]
    assert errors == ["error: Polygraphy 0.49.26 does not work with TensorRT 11.1.0: its CreateConfig reads "
                      "ILayer.precision_is_set and its inspector ICudaEngine.device_memory_size, which TensorRT 11 "
                      "removed: every build fails"], out.stderr
    assert "Traceback" not in out.stderr and not harness.calls(tmp_path / "calls.jsonl")


def test_the_unsupported_pair_really_fails_without_the_check(tmp_path):
    """What the check spares the user: Polygraphy 0.49.26's CreateConfig on TensorRT 11."""
    model = tmp_path / "m.onnx"
    _tiny_graph(model)
    script = ("import tensorrt\nfrom polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, "
              f"NetworkFromOnnxPath\nEngineBytesFromNetwork(NetworkFromOnnxPath({str(model)!r}, strongly_typed=True), "
              "config=CreateConfig())()\n")
    out = harness.run(["-c", script], harness.environment("11.1.0", "0.49.26", tmp_path / "calls.jsonl"))
    assert out.returncode != 0 and "precision_is_set" in out.stderr, out.stderr[-2000:]


def _tiny_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


# ---- every trt.X.Y the code names exists where it runs -----------------------------------------

# Names the code reaches only behind a guard, with the guard that must be in the same file.
GUARDED = {
    "IProgressMonitor": 'hasattr(trt, "IProgressMonitor")',  # TensorRT >= 10
    "MemoryPoolType": 'hasattr(trt, "MemoryPoolType")',
}


def _names_in_code():
    """(file, 'X' or 'X.Y') for every ``trt.X[.Y]`` attribute chain in the package and scripts."""
    found = []
    for path in sorted(list((ROOT / "autoglm_build").rglob("*.py")) + list((ROOT / "scripts").glob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
                found.append((path, node.attr, None))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                  and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt"):
                found.append((path, node.value.attr, node.attr))
    return found


def _exists(surface: dict, name: str, member) -> bool:
    classes = surface["classes"]
    if name not in classes:
        return name in surface["module"]
    if member is None or member.startswith("__"):
        return True
    seen, pending = set(), [name]
    while pending:
        current = pending.pop()
        seen.add(current)
        if member in classes[current]["members"]:
            return True
        pending += [b for b in classes[current]["bases"] if b in classes and b not in seen]
    return False


@pytest.mark.parametrize("version", harness.TRT_VERSIONS)
def test_every_tensorrt_name_the_code_uses_exists_in_each_surface(version):
    surface = json.loads((harness.SURFACES / f"{version}.json").read_text())
    names = _names_in_code()
    assert len(names) > 10  # the scan finds the code's TensorRT calls
    missing = []
    for path, name, member in names:
        if _exists(surface, name, member):
            continue
        guard = GUARDED.get(name)
        if guard is None or guard not in path.read_text():
            missing.append(f"{path.relative_to(ROOT)}: trt.{name}{'.' + member if member else ''}")
    assert not missing, f"not in TensorRT {version}: {missing}"


def test_the_scan_would_catch_a_removed_name():
    """TensorRT 11 has no TacticSource.CUBLAS: code that named it would fail the test above."""
    surface = json.loads((harness.SURFACES / "11.1.0.json").read_text())
    assert not _exists(surface, "TacticSource", "CUBLAS") and _exists(surface, "TacticSource", "JIT_CONVOLUTIONS")
    assert not _exists(surface, "ILayer", "precision_is_set") and _exists(surface, "IExecutionContext",
                                                                          "execute_async_v3")
    assert re.search(r"trt\.TacticSource\.CUBLAS\b", (ROOT / "autoglm_build" / "stages" / "engine.py").read_text()) \
        is None


def test_verbose_builder_log_has_timestamps_and_a_bad_level_is_one_line(vision_build, tmp_path):
    """AUTOGLM_BUILD_TRT_LOG=verbose: the builder's log with a timestamp on each line (to see where a slow
    build spends its time); any other value than verbose/info: exit 2, one line naming the variable."""
    import re

    workdir = tmp_path / "w"
    shutil.copytree(vision_build, workdir)
    env = harness.environment("8.5.3", "0.49.26", tmp_path / "calls.jsonl")
    args = ["-m", "autoglm_build", "engine", "-c", str(TINY), "-w", str(workdir), "-m", "vision", "--precision", "fp16"]
    out = harness.run(args, {**env, "AUTOGLM_BUILD_TRT_LOG": "verbose"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^\[V\] \(\d\d:\d\d:\d\d\) ", out.stderr + out.stdout, re.M), (out.stderr + out.stdout)[-2000:]
    bad = harness.run(args + ["--force"], {**env, "AUTOGLM_BUILD_TRT_LOG": "loud"})
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and errors == ["error: AUTOGLM_BUILD_TRT_LOG: 'loud' is not one of verbose, info"], \
        bad.stderr[-2000:]
