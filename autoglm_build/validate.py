"""Numerical comparison of two backends on a module's validation cases.

Separate structure from tolerance (optimum's ``ShapeError`` vs ``AtolError``): a missing output or
a wrong shape is fatal; a value difference is measured and held against the tolerance.

Tolerance rule: an output passes when ``max|a - b| <= atol + rtol * max|b|``, b being the
reference. ``max_rel`` in reports is ``max|a - b| / max|b|``, the error relative to the output's
scale (element-wise relative error explodes near zero and says little about a network's output).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Sequence

import numpy as np

from autoglm_build.config import Tolerance
from autoglm_build.errors import StructureError
from autoglm_build.modules.base import Case

Runner = Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]]


@dataclass
class Comparison:
    """One row of a validation table (one output group of one case, maxed over steps and layers)."""

    module: str
    case: str
    batch: int
    output: str
    shape: List[int]
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def output_group(name: str) -> str:
    """``present_key.17`` -> ``present_key``: per-layer outputs are reported together."""
    return name.split(".", 1)[0]


def compare_cases(
    module: str,
    cases: Iterable[Case],
    run: Runner,
    reference: Runner,
    tolerance: Tolerance,
    progress: Callable[[int], None] = lambda done: None,
) -> List[Comparison]:
    """Run every case through both backends and compare each output.

    Chained steps (the decoder's cache) feed each backend its own previous outputs, so errors
    accumulate as they would in real decoding. ``progress`` is called with the cases done so far.

    Raises:
        StructureError: an output is missing or its shape differs.
    """
    rows: List[Comparison] = []
    for case in cases:
        errors: Dict[str, List[float]] = {}
        carried: Dict[str, Dict[str, np.ndarray]] = {"run": {}, "ref": {}}
        for step in case.steps:
            got = run({**step, **carried["run"]})
            want = reference({**step, **carried["ref"]})
            for name, ref in want.items():
                out = got.get(name)
                if out is None or out.shape != ref.shape:
                    shape = None if out is None else list(out.shape)
                    raise StructureError(
                        f"{module}: output '{name}' ({case.label}, batch {case.batch}) has shape {shape}, "
                        f"expected {list(ref.shape)}"
                    )
                diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
                scale = float(np.max(np.abs(ref))) if ref.size else 0.0
                err = errors.setdefault(output_group(name), [0.0, 0.0])
                err[0], err[1] = max(err[0], diff), max(err[1], scale)
            if case.chain:
                carried = {"run": _chain(case.chain, got), "ref": _chain(case.chain, want)}
        rows += [_row(module, case, group, got, vals, tolerance) for group, vals in errors.items()]
        progress(len({(r.case, r.batch) for r in rows}))
    return rows


def _chain(chain: Mapping[str, str], outputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {chain[name]: value for name, value in outputs.items() if name in chain}


def _row(module: str, case: Case, group: str, last: Mapping[str, np.ndarray], vals: Sequence[float],
         tol: Tolerance) -> Comparison:
    max_abs, scale = vals
    shape = next(list(v.shape) for k, v in last.items() if output_group(k) == group)
    rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
    return Comparison(
        module=module, case=case.label, batch=case.batch, output=group, shape=shape,
        max_abs=max_abs, max_rel=rel, atol=tol.atol, rtol=tol.rtol,
        passed=max_abs <= tol.atol + tol.rtol * scale,
    )


def summarize(rows: Sequence[Comparison]) -> Dict[str, object]:
    """Manifest metrics of a validation: the rows, the worst errors and whether all passed."""
    return {
        "passed": all(r.passed for r in rows),
        "max_abs": max((r.max_abs for r in rows), default=0.0),
        "max_rel": max((r.max_rel for r in rows), default=0.0),
        "batches": sorted({r.batch for r in rows}),
        "rows": [r.as_dict() for r in rows],
    }


def ort_runner(session, output_names: Sequence[str]) -> Runner:
    """A :data:`Runner` over an ONNX Runtime session, feeding only the inputs the graph declares."""
    inputs = [i.name for i in session.get_inputs()]

    def run(feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = session.run(list(output_names), {k: feed[k] for k in inputs})
        return dict(zip(output_names, outs))

    return run


def torch_runner(module, input_names: Sequence[str], output_names: Sequence[str]) -> Runner:
    """A :data:`Runner` over a torch module called positionally in ``input_names`` order."""
    import torch

    def run(feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {name: out.numpy() for name, out in zip(output_names, outs)}

    return run
