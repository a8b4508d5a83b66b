"""A CUDA runtime for Polygraphy's ``cuda.wrapper()`` with host memory standing in for the GPU.

Polygraphy calls ``cudaMalloc``/``cudaMemcpy``/... on a ctypes handle; this handle answers them with
ctypes buffers whose addresses are the "device pointers", so the fake ``tensorrt``'s execution
context can read inputs and write outputs at the addresses the code under test bound.
"""

from __future__ import annotations

import ctypes
from typing import Dict


class FakeCudart:
    def __init__(self) -> None:
        self.buffers: Dict[int, ctypes.Array] = {}
        self.streams = 0

    @staticmethod
    def _set(ref, value: int) -> int:
        ref._obj.value = value
        return 0

    def cudaMalloc(self, ref, nbytes) -> int:
        size = max(int(getattr(nbytes, "value", nbytes)), 1)
        buffer = ctypes.create_string_buffer(size)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return self._set(ref, ctypes.addressof(buffer))

    def cudaFree(self, ptr) -> int:
        self.buffers.pop(int(ptr.value or 0), None)
        return 0

    def cudaMemcpy(self, dst, src, nbytes, kind) -> int:
        ctypes.memmove(dst.value, src.value, int(nbytes.value))
        return 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaStreamCreate(self, ref) -> int:
        self.streams += 1
        return self._set(ref, 0x1000 + self.streams)

    def cudaStreamSynchronize(self, ptr) -> int:
        return 0

    def cudaStreamDestroy(self, ptr) -> int:
        return 0

    def cudaDeviceSynchronize(self) -> int:
        return 0

    def cudaGetLastError(self) -> int:
        return 0


def install() -> FakeCudart:
    """Make Polygraphy's global CUDA wrapper use host memory."""
    from polygraphy.cuda import cuda

    wrapper = cuda.Cuda.__new__(cuda.Cuda)
    wrapper.handle = FakeCudart()
    cuda.G_CUDA = wrapper
    return wrapper.handle
