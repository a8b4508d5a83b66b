"""A CUDA runtime for Polygraphy's ``cuda.wrapper()`` with host memory standing in for the GPU.

Polygraphy calls ``cudaMalloc``/``cudaMemcpy``/... on a ctypes handle; this handle answers them with
ctypes buffers whose addresses are the "device pointers", so the fake ``tensorrt``'s execution
context can read inputs and write outputs at the addresses the code under test bound. The strided
copies the device KV cache makes (``cudaMemcpy2DAsync``, ``cudaMemcpy3DAsync``) and ``cudaMemsetAsync``
are answered too.

Every copy is counted by kind (``traffic``: calls and bytes of host-to-device, device-to-host,
device-to-device, whoever made it: Polygraphy's ``infer`` or the code under test) and logged
(``copies``: kind and bytes, in order), so a test can say what crossed to the host during one step.
"""

from __future__ import annotations

import ctypes
from typing import Dict, List, Tuple

KINDS = {0: "h2h", 1: "h2d", 2: "d2h", 3: "d2d", 4: "default"}
ALIGN = 256


def _int(value) -> int:
    return int(getattr(value, "value", value) or 0)


class FakeCudart:
    def __init__(self) -> None:
        self.buffers: Dict[int, ctypes.Array] = {}
        self.streams = 0
        self.traffic: Dict[str, List[int]] = {k: [0, 0] for k in KINDS.values()}  # kind -> [calls, bytes]
        self.copies: List[Tuple[str, int]] = []

    def _count(self, kind, nbytes: int) -> None:
        name = KINDS[_int(kind)]
        self.traffic[name][0] += 1
        self.traffic[name][1] += nbytes
        self.copies.append((name, nbytes))

    @staticmethod
    def _set(ref, value: int) -> int:
        ref._obj.value = value
        return 0

    def cudaMalloc(self, ref, nbytes) -> int:
        """256-byte aligned, as cudaMalloc's addresses are (TensorRT's tensor addresses must be)."""
        size = max(int(getattr(nbytes, "value", nbytes)), 1)
        buffer = ctypes.create_string_buffer(size + ALIGN - 1)
        address = -(-ctypes.addressof(buffer) // ALIGN) * ALIGN
        self.buffers[address] = buffer
        return self._set(ref, address)

    def cudaFree(self, ptr) -> int:
        self.buffers.pop(_int(ptr), None)
        return 0

    def cudaMemcpy(self, dst, src, nbytes, kind) -> int:
        self._count(kind, _int(nbytes))
        ctypes.memmove(_int(dst), _int(src), _int(nbytes))
        return 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream) -> int:
        dst, dpitch, src, spitch, width, height = (_int(v) for v in (dst, dpitch, src, spitch, width, height))
        if width > dpitch or width > spitch:
            return 12  # cudaErrorInvalidPitchValue
        self._count(kind, width * height)
        for line in range(height):
            ctypes.memmove(dst + line * dpitch, src + line * spitch, width)
        return 0

    def cudaMemcpy3DAsync(self, ref, stream) -> int:
        """``cudaMemcpy3DParms`` on linear memory: plane z, line y, byte x at ptr + (z * ysize + y) * pitch + x."""
        p = ref._obj
        if p.srcArray or p.dstArray:
            return 1  # cudaErrorInvalidValue: the fake has no CUDA arrays
        e, sp, dp = p.extent, p.srcPtr, p.dstPtr
        if e.width > sp.pitch or e.width > dp.pitch or p.srcPos.y + e.height > sp.ysize \
                or p.dstPos.y + e.height > dp.ysize:
            return 1
        self._count(p.kind, e.width * e.height * e.depth)
        for z in range(e.depth):
            for y in range(e.height):
                src = sp.ptr + ((p.srcPos.z + z) * sp.ysize + p.srcPos.y + y) * sp.pitch + p.srcPos.x
                dst = dp.ptr + ((p.dstPos.z + z) * dp.ysize + p.dstPos.y + y) * dp.pitch + p.dstPos.x
                ctypes.memmove(dst, src, e.width)
        return 0

    def cudaMemsetAsync(self, ptr, value, nbytes, stream) -> int:
        ctypes.memset(_int(ptr), _int(value), _int(nbytes))
        return 0

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
