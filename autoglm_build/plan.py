"""``--dry-run``: what a build would do, without allocating weights or writing anything.

Modules are built on torch's ``meta`` device, so parameter counts come from the real module code
(not a formula that could drift from it) at no memory cost, even at full width.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from autoglm_build.config import BuildConfig
from autoglm_build.modules import registry

FP32_BYTES = 4


def module_plan(cfg: BuildConfig, name: str) -> Dict[str, Any]:
    """Parameters, expected ONNX size and I/O of one module, built on the meta device."""
    import torch

    spec = registry.get(name)
    with torch.device("meta"):
        module = spec.build(cfg)
    params = sum(p.numel() for p in module.parameters())
    axes = spec.dynamic_axes(cfg)
    onnx_bytes = params * FP32_BYTES
    return {
        "module": name,
        "description": spec.description,
        "parameters": params,
        "onnx_bytes_estimate": onnx_bytes,
        "external_data": onnx_bytes > cfg.export.large_model_bytes,
        "inputs": {n: _axes(axes.get(n, {})) for n in spec.input_names(cfg)},
        "outputs": {n: _axes(axes.get(n, {})) for n in spec.output_names(cfg)},
    }


def build_plan(cfg: BuildConfig, modules: Sequence[str], stage_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The whole plan: modules with sizes, and per stage/module whether it is cached."""
    return {
        "config": cfg.name,
        "modules": [module_plan(cfg, m) for m in modules],
        "stages": stage_rows,
    }


def _axes(axes: Dict[int, str]) -> Dict[str, str]:
    return {str(axis): name for axis, name in sorted(axes.items())}
