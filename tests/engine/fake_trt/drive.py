"""Run inside a process whose ``tensorrt`` is the fake (see harness.py): everything the engine path
does on a GPU machine, against one workdir, each step's outcome as one JSON document on stdout.

    python tests/engine/fake_trt/drive.py CONFIG WORKDIR MODULE

Steps: ``engine`` fp16 and int8 (the int8 build with ``AUTOGLM_BUILD_TRT_TACTICS=cublas``) through the
CLI, ``verify`` of both engines through the CLI, ``TensorRTBackend.device_call`` against
``TensorRTBackend.run``, and ``polygraphy inspect model`` on the fp16 engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path


def cli(args):
    from typer.testing import CliRunner

    from autoglm_build.cli import app

    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(app, args)
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
            else "".join(traceback.format_exception(result.exception))}


def device_call(workdir: Path, module: str):
    import numpy as np

    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.stages.samples import load_samples

    arts = json.loads((workdir / "manifest.json").read_text())["artifacts"]
    samples = next(p for p in arts if p.startswith("samples/") and module in p)
    feed = next(iter(load_samples(workdir / samples).values()))[0]
    backend = open_backend(workdir, [module], "tensorrt", "fp16")
    try:
        bound = backend.device_call(module, feed)
        bound.call()
        bound.sync()
        got = {n: np.asarray(a.numpy(), dtype=np.float32) for n, a in bound.outputs.items()}
        want = backend.run(module, feed)
        return {"outputs": sorted(got), "max_diff": max(float(np.abs(got[n] - want[n]).max()) for n in got),
                "shapes": {n: list(v.shape) for n, v in got.items()}}
    finally:
        backend.close()


def inspect(engine: Path):
    from polygraphy.tools._main import main

    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["polygraphy", "inspect", "model", str(engine)]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return {"exit_code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-2000:]}


def step(results, name, func, *args):
    try:
        results[name] = func(*args)
    except BaseException as exc:  # reported, the next step still runs
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def main() -> None:
    config, workdir, module = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    common = ["-c", config, "-w", str(workdir), "-m", module]
    results = {}
    step(results, "engine-fp16", cli, ["engine", *common, "--precision", "fp16"])
    os.environ["AUTOGLM_BUILD_TRT_TACTICS"] = "cublas"
    step(results, "engine-int8", cli, ["engine", *common, "--precision", "int8"])
    os.environ.pop("AUTOGLM_BUILD_TRT_TACTICS")
    step(results, "verify", cli, ["verify", *common, "--json", "--precision", "fp16", "--precision", "int8"])
    step(results, "device_call", device_call, workdir, module)
    step(results, "inspect", inspect, workdir / "engines" / f"{module}.fp16.engine")
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
