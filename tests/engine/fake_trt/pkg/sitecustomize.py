"""Processes started by the fake-TensorRT tests get Polygraphy's CUDA wrapper on host memory."""

import os

if os.environ.get("FAKE_TRT_CUDA"):
    import fake_cuda

    fake_cuda.install()
