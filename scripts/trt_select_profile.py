"""Where the select engine's time goes (runtime/select.py's graph): TensorRT's per-layer profiler at 1 and 8 rows,
on the GPU harness (TensorRT 8.5, Python 3.9), for the graph with its vocabulary-wide passes in one pass and in
groups (``select.groups_of``), built here as the server builds it (no FASTER_DYNAMIC_SHAPES preview, cuBLAS only).

    trtpy scripts/trt_select_profile.py [--vocab 151552] [--k 64] [--fp16-logits]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np
import tensorrt as trt
from polygraphy import cuda

from autoglm_build.runtime.select import select_graph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151552)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--fp16-logits", action="store_true")
    args = parser.parse_args()
    for split in (False, True):
        model = select_graph(args.k, args.vocab, 7, np.float16 if args.fp16_logits else np.float32, split=split)
        print(f"--- vocabulary {args.vocab}, k {args.k}, {'in groups' if split else 'one pass'}")
        profile_engine(model.SerializeToString())
    return 0


def profile_engine(data: bytes) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # gone in 11: always explicit
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(data), parser.get_error(0)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cublas = getattr(trt.TacticSource, "CUBLAS", None)  # the harness's cuDNN is a stub; 11 has no cuBLAS source
    if cublas is not None:
        config.set_tactic_sources(1 << int(cublas))
    preview = getattr(trt.PreviewFeature, "FASTER_DYNAMIC_SHAPES_0805", None)  # 8.5-9.x; gone in 10
    if preview is not None:  # off, as the server builds the select engine (a Myelin DCHECK with it at 151,552 ids)
        config.set_preview_feature(preview, False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        width = t.shape[1]
        profile.set_shape(t.name, (1, width), (8, width), (8, width))
    config.add_optimization_profile(profile)
    start = time.time()
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    print(f"built in {time.time() - start:.1f} s")
    times = collections.defaultdict(float)

    class Profiler(trt.IProfiler):
        def report_layer_time(self, name, ms):
            times[name] += ms

    NP = {trt.float32: np.float32, trt.float16: np.float16, trt.int32: np.int32, trt.int8: np.int8, trt.bool: np.bool_}
    rng = np.random.default_rng(0)
    for rows in (1, 8):
        context = engine.create_execution_context()  # one at a time: a profile serves one context
        buffers, bindings = [], []
        for b in range(engine.num_bindings):
            name = engine.get_binding_name(b)
            if engine.binding_is_input(b):
                context.set_binding_shape(b, (rows, engine.get_binding_shape(b)[1]))
        for b in range(engine.num_bindings):
            shape = tuple(context.get_binding_shape(b))
            dtype = NP[engine.get_binding_dtype(b)]
            host = np.zeros(shape, dtype)
            if engine.get_binding_name(b) in ("logits", "noise"):
                host = rng.standard_normal(shape).astype(dtype)
            arr = cuda.DeviceArray(shape=shape, dtype=dtype)
            arr.copy_from(np.ascontiguousarray(host))
            buffers.append(arr)
            bindings.append(arr.ptr)
        for _ in range(5):
            context.execute_v2(bindings)
        iters = 50
        start = time.perf_counter()
        for _ in range(iters):
            context.execute_v2(bindings)
        wall = (time.perf_counter() - start) / iters * 1e3
        times.clear()
        context.profiler = Profiler()
        for _ in range(iters):
            context.execute_v2(bindings)
        del context
        total = sum(times.values()) / iters
        print(f"rows {rows}: {wall:.3f} ms a run (execute_v2, synchronous); layers {total:.3f} ms")
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {ms / iters:8.4f} ms  {100 * ms / iters / total:5.1f}%  {name[:110]}")
        for arr in buffers:
            arr.free()


if __name__ == "__main__":
    sys.exit(main())
