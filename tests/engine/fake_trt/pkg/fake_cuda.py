"""A CUDA runtime for Polygraphy's ``cuda.wrapper()`` with host memory standing in for the GPU(s).

Polygraphy calls ``cudaMalloc``/``cudaMemcpy``/... on a ctypes handle; this handle answers them with
ctypes buffers whose addresses are the "device pointers", so the fake ``tensorrt``'s execution
context can read inputs and write outputs at the addresses the code under test bound. The strided
copies the device KV cache makes (``cudaMemcpy2DAsync``, ``cudaMemcpy3DAsync``) and ``cudaMemsetAsync``
are answered too.

Every copy is counted by kind (``traffic``: calls and bytes of host-to-device, device-to-host,
device-to-device, peer, whoever made it: Polygraphy's ``infer`` or the code under test) and logged
(``copies``: kind and bytes, in order), so a test can say what crossed to the host during one step.

**Several GPUs** (``FAKE_CUDA_DEVICES``, default 1; ``FAKE_CUDA_P2P=0``: no peer access): the current
device is per host thread (``cudaSetDevice``), every allocation, stream and event belongs to the device
current when it was made, and what would be a cross-device mistake on a real machine is a
**violation** (recorded in ``violations``, printed to stderr, and the call fails with a CUDA error, the
engine call with False):

- an engine call (:meth:`kernel`, from the fake ``tensorrt``) whose context, stream or current device is
  not its engine's device, or that binds memory of another device;
- a copy or memset on a stream of one device touching memory of another (stricter than CUDA, which
  lets a copy run on another device's stream: the copy would then be ordered with the wrong stream's
  work), a ``cudaMemcpyDeviceToDevice`` between two devices' memory (a peer copy is
  ``cudaMemcpyPeerAsync``, or ``cudaMemcpyDefault`` under UVA), a peer copy naming the wrong devices;
- an event recorded on another device's stream;
- reading memory another stream wrote, or writing memory another stream read or wrote, with nothing
  ordering the two: no event recorded after the first and waited for by the second stream, no host
  synchronization in between (``cudaStreamSynchronize`` of the first stream, ``cudaDeviceSynchronize``,
  ``cudaFree`` or a synchronous ``cudaMemcpy``, which CUDA makes wait for the device). The fake runs
  everything at once, so a missing wait changes no value here; this check is what shows it.

``allocated`` (bytes per device) and ``kernels`` (engine name, device, devices of its bound memory) say
where things ran; ``history`` lists every ``cudaMalloc`` and ``cudaFree`` (kind, address, bytes, device) in
order, and freeing what is not a live allocation (twice, or never allocated) is a violation.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import sys
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

KINDS = {0: "h2h", 1: "h2d", 2: "d2h", 3: "d2d", 4: "default"}
ALIGN = 256
INVALID_VALUE, INVALID_DEVICE, INVALID_HANDLE, PEER_ALREADY = 1, 101, 400, 704  # cudaError_t
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED = 900, 901  # cudaErrorStreamCaptureUnsupported, ...Invalidated
_INSTALLED: Optional[FakeCudart] = None


def _int(value) -> int:
    return int(getattr(value, "value", value) or 0)


class Allocation:
    __slots__ = ("address", "size", "device", "write", "reads")

    def __init__(self, address: int, size: int, device: int) -> None:
        self.address, self.size, self.device = address, size, device
        self.write: Optional[Tuple[int, int]] = None  # (stream, its op number) of the last write
        self.reads: Dict[int, int] = {}  # stream -> op number of its last read since that write


class FakeCudart:
    def __init__(self) -> None:
        self.count = int(os.environ.get("FAKE_CUDA_DEVICES", "1"))
        self.capability = tuple(int(p) for p in os.environ.get("FAKE_CUDA_CC", "9.0").split("."))
        self.p2p = os.environ.get("FAKE_CUDA_P2P", "1") != "0"
        self.buffers: Dict[int, ctypes.Array] = {}
        self.host_buffers: Dict[int, ctypes.Array] = {}  # cudaHostAlloc's
        self.allocations: Dict[int, Allocation] = {}
        self._starts: List[int] = []  # sorted allocation addresses
        self.streams = 0
        self.stream_device: Dict[int, int] = {}
        self.events: Dict[int, Tuple[int, Dict[int, int]]] = {}  # event -> (device, what its record saw)
        self.peers: set = set()  # (device, peer) pairs with peer access enabled
        self.allocated: Dict[int, int] = {}  # device -> bytes ever allocated there
        self.history: List[Tuple[str, int, int, int]] = []  # ("malloc" or "free", address, bytes, device)
        self.kernels: List[Tuple[str, int, List[int]]] = []
        self.violations: List[str] = []
        self.traffic: Dict[str, List[int]] = {k: [0, 0] for k in [*KINDS.values(), "peer"]}  # kind -> [calls, bytes]
        self.copies: List[Tuple[str, int]] = []
        # ordering: ops issued per stream, what each stream waited for, what the host waited for
        self.clock: Dict[int, int] = {}
        self.seen: Dict[int, Dict[int, int]] = {}
        self.done: Dict[int, int] = {}
        self._thread = threading.local()
        # CUDA graphs: stream -> the engine runs captured so far; graph / executable -> its runs; launches made
        self.capturing: Dict[int, List[Any]] = {}
        self.graphs: Dict[int, List[Any]] = {}
        self.execs: Dict[int, List[Any]] = {}
        self.launches = 0
        self.refuse_capture = False
        self.handles = 0

    # ---- devices ----------------------------------------------------------------------------------

    @property
    def device(self) -> int:
        """The calling thread's current device."""
        return getattr(self._thread, "device", 0)

    def cudaSetDevice(self, device) -> int:
        device = _int(device)
        if not 0 <= device < self.count:
            return INVALID_DEVICE
        self._thread.device = device
        return 0

    def cudaGetDevice(self, ref) -> int:
        return self._set(ref, self.device)

    def cudaGetDeviceCount(self, ref) -> int:
        return self._set(ref, self.count)

    def cudaDeviceGetAttribute(self, ref, attribute, device) -> int:
        if not 0 <= _int(device) < self.count:
            return INVALID_DEVICE
        values = {75: self.capability[0], 76: self.capability[1]}  # compute capability major, minor
        return self._set(ref, values.get(_int(attribute), 0))

    def cudaDeviceCanAccessPeer(self, ref, device, peer) -> int:
        device, peer = _int(device), _int(peer)
        if not (0 <= device < self.count and 0 <= peer < self.count):
            return INVALID_DEVICE
        return self._set(ref, int(self.p2p and device != peer))

    def cudaDeviceEnablePeerAccess(self, peer, flags) -> int:
        pair = (self.device, _int(peer))
        if pair in self.peers:
            return PEER_ALREADY
        if not self.p2p or pair[0] == pair[1]:
            return INVALID_DEVICE
        self.peers.add(pair)
        return 0

    def violation(self, message: str) -> None:
        self.violations.append(message)
        print(f"[fake CUDA] violation: {message}", file=sys.stderr, flush=True)

    # ---- memory -----------------------------------------------------------------------------------

    def find(self, ptr: int) -> Optional[Allocation]:
        """The allocation holding address ``ptr`` (None: host memory)."""
        at = bisect.bisect_right(self._starts, ptr) - 1
        if at < 0:
            return None
        alloc = self.allocations[self._starts[at]]
        return alloc if ptr < alloc.address + alloc.size else None

    def device_of(self, ptr: int) -> Optional[int]:
        alloc = self.find(ptr)
        return alloc.device if alloc is not None else None

    def cudaMalloc(self, ref, nbytes) -> int:
        """256-byte aligned, as cudaMalloc's addresses are (TensorRT's tensor addresses must be)."""
        size = max(int(getattr(nbytes, "value", nbytes)), 1)
        buffer = ctypes.create_string_buffer(size + ALIGN - 1)
        address = -(-ctypes.addressof(buffer) // ALIGN) * ALIGN
        self.buffers[address] = buffer
        self.allocations[address] = Allocation(address, size, self.device)
        bisect.insort(self._starts, address)
        self.allocated[self.device] = self.allocated.get(self.device, 0) + size
        self.history.append(("malloc", address, size, self.device))
        return self._set(ref, address)

    def cudaHostAlloc(self, ref, nbytes, flags) -> int:
        """Page-locked host memory: host memory here too (not an allocation of any device), kept until freed."""
        size = max(int(getattr(nbytes, "value", nbytes)), 1)
        buffer = ctypes.create_string_buffer(size)
        self.host_buffers[ctypes.addressof(buffer)] = buffer
        return self._set(ref, ctypes.addressof(buffer))

    def cudaFreeHost(self, ptr) -> int:
        if self.host_buffers.pop(_int(ptr), None) is None:
            self.violation(f"cudaFreeHost({_int(ptr):#x}): not page-locked memory of cudaHostAlloc")
            return INVALID_VALUE
        return 0

    def cudaPointerGetAttributes(self, ref, ptr) -> int:
        """CUDA >= 10's ``cudaPointerAttributes``: ``type`` 2 (device memory) and ``device`` of an allocation."""
        alloc = self.find(_int(ptr))
        if alloc is None:
            return INVALID_VALUE
        ref._obj.type, ref._obj.device = 2, alloc.device
        return 0

    def cudaFree(self, ptr) -> int:
        self._barrier()  # cudaFree waits for the device
        address = _int(ptr)
        if not address:  # cudaFree(NULL): nothing, as CUDA
            return 0
        alloc = self.allocations.pop(address, None)
        if alloc is None:
            self.violation(f"cudaFree({address:#x}): not a live allocation (freed twice, or never allocated)")
            return INVALID_VALUE
        del self.buffers[address]
        self._starts.remove(address)
        self.history.append(("free", address, alloc.size, alloc.device))
        return 0

    # ---- ordering between streams -------------------------------------------------------------

    def _ordered(self, stream: int, at: Tuple[int, int]) -> bool:
        """Whether op ``at`` (stream, number) comes before what ``stream`` enqueues now."""
        other, n = at
        return other == stream or self.done.get(other, 0) >= n or self.seen.get(stream, {}).get(other, 0) >= n

    def _access(self, what: str, stream: int, reads: Iterable[int], writes: Iterable[int]) -> None:
        """Op ``what`` on ``stream`` reads/writes the allocations holding these addresses: check its order."""
        n = self.clock[stream] = self.clock.get(stream, 0) + 1
        reads = [a for a in (self.find(p) for p in reads) if a is not None]
        writes = [a for a in (self.find(p) for p in writes) if a is not None]
        for alloc in reads + writes:
            if alloc.write is not None and not self._ordered(stream, alloc.write):
                self.violation(f"{what} on stream {stream:#x} uses device {alloc.device} memory {alloc.address:#x} "
                               f"written on stream {alloc.write[0]:#x} with no event wait or synchronization between")
        for alloc in writes:
            for other, m in alloc.reads.items():
                if not self._ordered(stream, (other, m)):
                    self.violation(f"{what} on stream {stream:#x} overwrites device {alloc.device} memory "
                                   f"{alloc.address:#x} that stream {other:#x} reads, with nothing ordering them")
        for alloc in reads:
            alloc.reads[stream] = n
        for alloc in writes:
            alloc.write, alloc.reads = (stream, n), {}

    def _barrier(self) -> None:
        """The host waited for everything enqueued so far."""
        self.done = dict(self.clock)

    def _on_device(self, what: str, stream: int, ptrs: Iterable[int]) -> bool:
        """Memory touched by an op on ``stream`` must be that stream's device's (host memory aside)."""
        device = self.stream_device.get(stream, self.device)
        wrong = [(p, d) for p, d in ((p, self.device_of(p)) for p in ptrs) if d is not None and d != device]
        for ptr, d in wrong:
            self.violation(f"{what} on a stream of device {device} touches device {d} memory {ptr:#x}")
        return not wrong

    # ---- copies -----------------------------------------------------------------------------------

    def _count(self, kind, nbytes: int) -> None:
        name = kind if isinstance(kind, str) else KINDS[_int(kind)]
        self.traffic[name][0] += 1
        self.traffic[name][1] += nbytes
        self.copies.append((name, nbytes))

    def _copy_checks(self, what: str, dst: int, src: int, kind: int, stream: Optional[int]) -> bool:
        devices = self.device_of(dst), self.device_of(src)
        if kind == 3 and None not in devices and devices[0] != devices[1]:
            self.violation(f"{what} cudaMemcpyDeviceToDevice from device {devices[1]} memory to device {devices[0]} "
                           "memory (a peer copy is cudaMemcpyPeer, or cudaMemcpyDefault under UVA)")
            return False
        if kind == 4 or stream is None:  # cudaMemcpyDefault: UVA tells the places; a synchronous copy waits anyway
            return True
        return self._on_device(what, stream, (dst, src))

    @staticmethod
    def _set(ref, value: int) -> int:
        ref._obj.value = value
        return 0

    def cudaMemcpy(self, dst, src, nbytes, kind) -> int:
        """Synchronous: after all the device's work, and done when it returns."""
        dst, src, nbytes = _int(dst), _int(src), _int(nbytes)
        if self._captured("cudaMemcpy", None):
            return CAPTURE_UNSUPPORTED
        if not self._copy_checks("cudaMemcpy", dst, src, _int(kind), None):
            return INVALID_VALUE
        self._barrier()
        self._count(kind, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return 0

    def _captured(self, what: str, stream: Optional[int]) -> bool:
        """A copy or wait on a capturing stream (or a synchronous one during any capture): what the code that
        captures must keep out of it (a pageable copy or a wait cannot be captured; CUDA fails the capture)."""
        if (stream is None and self.capturing) or (stream is not None and stream in self.capturing):
            self.violation(f"{what} while stream {next(iter(self.capturing)):#x} is capturing a CUDA graph")
            return True
        return False

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:
        dst, src, nbytes, stream = _int(dst), _int(src), _int(nbytes), _int(stream)
        if self._captured("cudaMemcpyAsync", stream):
            return CAPTURE_UNSUPPORTED
        if not self._copy_checks("cudaMemcpyAsync", dst, src, _int(kind), stream):
            return INVALID_VALUE
        self._access("cudaMemcpyAsync", stream, [src], [dst])
        self._count(kind, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return 0

    def cudaMemcpyPeerAsync(self, dst, dst_device, src, src_device, nbytes, stream) -> int:
        dst, src, nbytes, stream = _int(dst), _int(src), _int(nbytes), _int(stream)
        claimed, actual = (_int(dst_device), _int(src_device)), (self.device_of(dst), self.device_of(src))
        if claimed != actual:
            self.violation(f"cudaMemcpyPeerAsync names devices {claimed} (dst, src); the memory is on {actual}")
            return INVALID_VALUE
        if self.stream_device.get(stream) not in claimed:
            self.violation(f"cudaMemcpyPeerAsync between devices {claimed} on a stream of device "
                           f"{self.stream_device.get(stream)}")
            return INVALID_HANDLE
        self._access("cudaMemcpyPeerAsync", stream, [src], [dst])
        self._count("peer", nbytes)
        ctypes.memmove(dst, src, nbytes)
        return 0

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream) -> int:
        dst, dpitch, src, spitch, width, height = (_int(v) for v in (dst, dpitch, src, spitch, width, height))
        if width > dpitch or width > spitch:
            return 12  # cudaErrorInvalidPitchValue
        if not self._copy_checks("cudaMemcpy2DAsync", dst, src, _int(kind), _int(stream)):
            return INVALID_VALUE
        self._access("cudaMemcpy2DAsync", _int(stream), [src], [dst])
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
        if not self._copy_checks("cudaMemcpy3DAsync", dp.ptr, sp.ptr, _int(p.kind), _int(stream)):
            return INVALID_VALUE
        self._access("cudaMemcpy3DAsync", _int(stream), [sp.ptr], [dp.ptr])
        self._count(p.kind, e.width * e.height * e.depth)
        for z in range(e.depth):
            for y in range(e.height):
                src = sp.ptr + ((p.srcPos.z + z) * sp.ysize + p.srcPos.y + y) * sp.pitch + p.srcPos.x
                dst = dp.ptr + ((p.dstPos.z + z) * dp.ysize + p.dstPos.y + y) * dp.pitch + p.dstPos.x
                ctypes.memmove(dst, src, e.width)
        return 0

    def cudaMemsetAsync(self, ptr, value, nbytes, stream) -> int:
        if not self._on_device("cudaMemsetAsync", _int(stream), [_int(ptr)]):
            return INVALID_VALUE
        self._access("cudaMemsetAsync", _int(stream), [], [_int(ptr)])
        ctypes.memset(_int(ptr), _int(value), _int(nbytes))
        return 0

    # ---- engine calls (the fake tensorrt's execute_async_v3) -----------------------------------------

    def kernel(self, name: str, device: int, stream: int, reads: List[int], writes: List[int]) -> bool:
        """An engine of ``device`` runs on ``stream``, reading and writing memory at these addresses."""
        problems = []
        if self.device != device:
            problems.append(f"called with device {self.device} current")
        if self.stream_device.get(stream, self.device) != device:
            problems.append(f"on a stream of device {self.stream_device.get(stream)}")
        bound = sorted({d for d in (self.device_of(p) for p in reads + writes) if d is not None})
        if bound not in ([], [device]):
            problems.append(f"bound to memory on devices {bound}")
        for problem in problems:
            self.violation(f"engine {name} of device {device} {problem}")
        self.kernels.append((name, device, bound))
        self._access(f"engine {name}", stream, reads, writes)
        return not problems

    # ---- streams and events -----------------------------------------------------------------------

    def cudaStreamCreate(self, ref) -> int:
        self.streams += 1
        stream = 0x1000 + self.streams
        self.stream_device[stream] = self.device
        return self._set(ref, stream)

    def cudaStreamCreateWithFlags(self, ref, flags) -> int:
        return self.cudaStreamCreate(ref)

    def cudaStreamSynchronize(self, ptr) -> int:
        stream = _int(ptr)
        if self._captured("cudaStreamSynchronize", stream):
            return CAPTURE_UNSUPPORTED
        self.done[stream] = max(self.done.get(stream, 0), self.clock.get(stream, 0))
        for other, n in self.seen.get(stream, {}).items():
            self.done[other] = max(self.done.get(other, 0), n)
        return 0

    def cudaStreamDestroy(self, ptr) -> int:
        return 0

    def cudaEventCreateWithFlags(self, ref, flags) -> int:
        event = 0x100000 + len(self.events) + 1
        self.events[event] = (self.device, {})
        return self._set(ref, event)

    def cudaEventCreate(self, ref) -> int:
        return self.cudaEventCreateWithFlags(ref, 0)

    def cudaEventRecord(self, event, stream) -> int:
        event, stream = _int(event), _int(stream)
        device = self.events[event][0]
        if self.stream_device.get(stream) != device:
            self.violation(f"event of device {device} recorded on a stream of device {self.stream_device.get(stream)}")
            return INVALID_HANDLE
        self.events[event] = (device, {**self.seen.get(stream, {}), stream: self.clock.get(stream, 0)})
        return 0

    def cudaStreamWaitEvent(self, stream, event, flags) -> int:
        seen = self.seen.setdefault(_int(stream), {})
        for other, n in self.events[_int(event)][1].items():
            seen[other] = max(seen.get(other, 0), n)
        return 0

    def cudaEventSynchronize(self, event) -> int:
        for other, n in self.events[_int(event)][1].items():
            self.done[other] = max(self.done.get(other, 0), n)
        return 0

    def cudaEventDestroy(self, event) -> int:
        return 0

    def cudaDeviceSynchronize(self) -> int:
        self._barrier()
        return 0

    def cudaGetLastError(self) -> int:
        return 0

    # ---- CUDA graphs: a capture records the engines run on the stream, a launch runs them again ----------------

    def cudaStreamBeginCapture(self, stream, mode) -> int:
        stream = _int(stream)
        if self.refuse_capture:  # a test's stand-in for a driver or TensorRT that does not let the step be captured
            return CAPTURE_UNSUPPORTED
        if stream in self.capturing:
            self.violation(f"capture begun twice on stream {stream:#x}")
            return INVALID_VALUE
        self.capturing[stream] = []
        return 0

    def capture(self, stream: int, run: Any) -> bool:
        """Called by the fake TensorRT's ``execute_async_v3``: ``run(stream)`` recorded if ``stream`` is capturing
        (then the engine does not run now), else False."""
        ops = self.capturing.get(int(stream or 0))
        if ops is None:
            return False
        ops.append(run)
        return True

    def cudaStreamEndCapture(self, stream, ref) -> int:
        ops = self.capturing.pop(_int(stream), None)
        if ops is None:
            return INVALID_VALUE
        self.handles += 1  # never reused: a destroyed handle stays invalid
        handle = 0x200000 + self.handles
        self.graphs[handle] = ops
        return self._set(ref, handle)

    def cudaGraphInstantiateWithFlags(self, ref, graph, flags) -> int:
        ops = self.graphs.get(_int(graph))
        if ops is None:
            return INVALID_VALUE
        self.handles += 1
        handle = 0x300000 + self.handles
        self.execs[handle] = list(ops)
        return self._set(ref, handle)

    def cudaGraphLaunch(self, graph_exec, stream) -> int:
        stream = _int(stream)
        ops = self.execs.get(_int(graph_exec))
        if ops is None or self._captured("cudaGraphLaunch", stream):
            return INVALID_VALUE
        self.launches += 1
        for run in ops:
            if not run(stream):
                return INVALID_VALUE
        return 0

    def cudaGraphExecDestroy(self, graph_exec) -> int:
        return 0 if self.execs.pop(_int(graph_exec), None) is not None else INVALID_VALUE

    def cudaGraphDestroy(self, graph) -> int:
        return 0 if self.graphs.pop(_int(graph), None) is not None else INVALID_VALUE

    def summary(self) -> Dict:
        """What a test asks after a run: violations, bytes allocated per device, engines run per device."""
        ran: Dict[str, List[int]] = {}
        for name, device, bound in self.kernels:
            devices = ran.setdefault(name, [])
            for d in [device, *bound]:
                if d not in devices:
                    devices.append(d)
        return {"violations": list(self.violations), "allocated": {str(d): n for d, n in self.allocated.items()},
                "engines": {name: sorted(d) for name, d in ran.items()}, "peer": self.traffic["peer"],
                "peer_access": sorted(f"{a}->{b}" for a, b in self.peers)}


def installed() -> Optional[FakeCudart]:
    """The runtime :func:`install` put in place in this process (None: not installed)."""
    return _INSTALLED


def install() -> FakeCudart:
    """Make Polygraphy's global CUDA wrapper use host memory."""
    global _INSTALLED
    from polygraphy.cuda import cuda

    wrapper = cuda.Cuda.__new__(cuda.Cuda)
    wrapper.handle = FakeCudart()
    cuda.G_CUDA = wrapper
    _INSTALLED = wrapper.handle
    return wrapper.handle
