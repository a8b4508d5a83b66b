"""autoglm-build: AutoGLM-Phone-9B from PyTorch to verified TensorRT engines.

The package is importable without torch: torch and transformers are imported only by the
modules that build or export PyTorch models, so the engine path runs under the TensorRT
harness's Python 3.9 with numpy, onnx, polygraphy and tensorrt alone.
"""

__version__ = "0.1.0"
