"""The TensorRT side: profiles, builds, sidecars, verification.

Everything under this package imports on Python 3.9 with numpy, onnx, polygraphy, tensorrt, typer,
rich, pydantic and pyyaml only (the GPU harness's interpreter): no torch, no transformers.
TensorRT itself is imported lazily by :func:`autoglm_build.engine.tensorrt.load`.
"""
