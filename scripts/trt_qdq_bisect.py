"""Which Q/DQ placements make a TensorRT build fail? Build variants of one INT8 graph side by side.

Each variant takes the Q/DQ pairs away from one class of consumers (the consumer then reads the FP32
tensor the pair wrapped), builds the engine the way ``autoglm-build engine`` does (same profiles,
same LayerNorm decomposition below TensorRT 8.6, each build in a child process so an abort is a
row, not a crash), and prints one row per variant. Used on the GPU harness to find what TensorRT
8.5's Myelin rejects in the vision encoder (``DCHECK(opnd->is_data())``):

    trtpy scripts/trt_qdq_bisect.py -w build/autoglm-phone-tiny -m vision -c configs/autoglm-phone-tiny.yaml
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List

import onnx

from autoglm_build.config import load_config
from autoglm_build.engine.profiles import profiles
from autoglm_build.errors import UserError
from autoglm_build.onnx_io import save_model
from autoglm_build.rewrites.qdq import rewire_qdq_consumers
from autoglm_build.stages.engine import build_isolated, for_this_tensorrt

Rule = Callable[[onnx.NodeProto, int, dict], bool]


def _first_conv(model) -> str:
    return next((n.name for n in model.graph.node if n.op_type == "Conv"), "")


VARIANTS: Dict[str, Rule] = {
    "all Q/DQ (as calibrated)": lambda node, i, g: False,
    "none on Conv": lambda node, i, g: node.op_type == "Conv",
    "none on the first Conv": lambda node, i, g: node.name == g["first_conv"],
    "none on the graph input": lambda node, i, g: g["q_source"] in g["graph_inputs"],
    "none on activation x activation MatMul": lambda node, i, g: node.op_type == "MatMul" and g["bmm"],
    "only on MatMul/Gemm/Conv": lambda node, i, g: node.op_type not in ("MatMul", "Gemm", "Conv"),
    "none on Sigmoid/Mul/Add": lambda node, i, g: node.op_type in ("Sigmoid", "Mul", "Add"),
}


def strip(model, rule: Rule) -> int:
    """Rewire the consumers ``rule`` selects from DQ(Q(x)) to x; drop what is left unused."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}

    def wrapped(name):  # x for an input that reads DQ(Q(x)), else None
        dq = producer.get(name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    bmm = {n.name for n in model.graph.node
           if sum(1 for i in n.input if wrapped(i) is not None and wrapped(i) not in inits) >= 2}
    facts = {"first_conv": _first_conv(model), "graph_inputs": {i.name for i in model.graph.input}}
    return rewire_qdq_consumers(model, lambda node, i, source: rule(
        node, i, dict(facts, q_source=source, bmm=node.name in bmm)))


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-w", "--workdir", type=Path, required=True)
    parser.add_argument("-m", "--module", default="vision")
    parser.add_argument("-c", "--config", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=len(VARIANTS))
    parser.add_argument("--only", nargs="*", help="variant names to build (default: all)")
    args = parser.parse_args(argv)
    from autoglm_build.engine import tensorrt as trt_env

    trt = trt_env.load()
    cfg = load_config(args.config)
    source = args.workdir / "int8" / f"{args.module}.onnx"
    shapes = profiles(cfg, source, cfg.engine.max_batch, cfg.engine.opt_batch)
    names = args.only or list(VARIANTS)
    tmp = Path(tempfile.mkdtemp(dir=args.workdir, prefix=".qdq-bisect-"))
    graphs = {}
    for k, name in enumerate(names):
        model = onnx.load(str(source))
        rewired = strip(model, VARIANTS[name])
        qdq = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
        (tmp / f"v{k}").mkdir()
        path = save_model(model, tmp / f"v{k}" / source.name, 1 << 30)[0]
        graphs[name] = (path, rewired, qdq)

    def run(name: str):
        path, rewired, qdq = graphs[name]
        start = time.perf_counter()
        try:
            with for_this_tensorrt(trt, path, path.parent) as (parsed, _):
                build_isolated(parsed, "int8", shapes, cfg.engine.workspace_mib,
                               path.parent / "timing.cache", path.parent)
            result = "built"
        except UserError as exc:
            result = "FAILED: " + exc.message.splitlines()[0][-90:]
        return name, rewired, qdq, time.perf_counter() - start, result

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run, names))
    print(f"\n{args.module} int8, TensorRT {trt.__version__}")
    print(f"{'variant':40} {'rewired':>7} {'Q left':>6} {'seconds':>8}  result")
    for name, rewired, qdq, seconds, result in rows:
        print(f"{name:40} {rewired:7d} {qdq:6d} {seconds:8.1f}  {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
