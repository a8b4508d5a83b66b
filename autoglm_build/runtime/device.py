"""GPU memory for the device-resident KV cache: allocations, copies and one stream, through Polygraphy's CUDA wrapper.

The GPU harness has no torch (nor CuPy): what it has is Polygraphy, whose ``cuda.wrapper()`` is a ctypes
handle on ``libcudart`` with ``malloc``/``free``/``memcpy`` and a :class:`polygraphy.cuda.Stream`. The
cache needs three more runtime calls, made on the same handle: ``cudaMemcpy3DAsync`` (a block of columns
of every head of every cache tensor in one call: see :class:`Layout`), ``cudaMemcpy2DAsync`` (logit rows,
a column range of each) and ``cudaMemsetAsync`` (zeros under masked columns). No dependency is added.

:class:`Device` counts the bytes and calls of each copy kind it makes (``traffic``): the serving side's
own account of what crosses to and from the host, which the tests check on the fake CUDA runtime and
on a GPU alike.

**Several GPUs** (issue 15: the decoder's stages placed on GPUs, ``serve --devices 0,1``): a
:class:`Device` belongs to one GPU (``index``) and makes it current for the calling thread before each
allocation and each enqueued call (CUDA's current device is per host thread, and the scheduler, the
request threads and the loader are different threads). :meth:`Device.peer` copies between two GPUs
(``cudaMemcpyPeerAsync``) on one stream after an event wait on the other (:meth:`Device.wait_for`).
``Device()`` with no index never sets a device: one-GPU serving makes no call it did not make before.
:func:`stage_devices` is the placement rule, :func:`check_placement` what a placement may not be.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.errors import EnvironmentMissing, UserError

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
PEER = -1  # not a cudaMemcpyKind: the traffic key of cudaMemcpyPeerAsync (GPU to GPU)
KINDS = {H2D: "h2d", D2H: "d2h", D2D: "d2d", PEER: "peer"}
EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming: an event only to order streams
CAPTURE_LOCAL = 1  # cudaStreamCaptureModeThreadLocal: only this thread's unsafe calls break the capture
STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking
PEER_ACCESS_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled
CC_MAJOR, CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor


# ---- placement: which GPU each loaded engine runs on ------------------------------------------------


def parse_devices(text: str, origin: str = "--devices") -> List[int]:
    """``"0,1"`` -> ``[0, 1]``.

    Raises:
        UserError: not a comma-separated list of distinct GPU indices (exit 2).
    """
    items = [t.strip() for t in str(text).split(",")]
    if not all(t.isdigit() for t in items):
        raise UserError(f"{origin} {text!r}: not a comma-separated list of GPU indices (e.g. 0,1)")
    devices = [int(t) for t in items]
    twice = sorted({d for d in devices if devices.count(d) > 1})
    if twice:
        raise UserError(f"{origin} {text}: GPU {twice[0]} listed twice", hint="list each GPU once, in stage order")
    return devices


def stage_devices(devices: Sequence[int], stages: int, head: bool = False) -> List[int]:
    """The GPU of each of ``stages`` stages: stage ``i`` on ``devices[i * len(devices) // stages]`` (contiguous
    runs of stages per GPU, the earlier GPUs taking the remainder's stages last: 3 stages on 2 GPUs are 0, 0, 1).
    ``head``: one more part, the head stage (``decoder.head_stage``: no layer, no cache), on the last stage's GPU."""
    placed = [devices[i * len(devices) // stages] for i in range(stages)]
    return placed + placed[-1:] if head else placed


def check_placement(devices: Sequence[int], stages: int, origin: str = "--devices") -> None:
    """A placement may not list more GPUs than the decoder has stages (a listed GPU would hold nothing).

    Raises:
        UserError: naming the option or field, the GPUs and the stages (exit 2).
    """
    shown = ",".join(str(d) for d in devices)
    if not devices:
        raise UserError(f"{origin}: no GPU listed", hint="list the GPUs the decoder's stages run on, e.g. 0,1")
    if len(devices) > stages:
        what = "a decoder built as one stage" if stages == 1 else f"a decoder of {stages} stages"
        raise UserError(f"{origin} {shown}: {len(devices)} GPUs for {what}; each GPU takes at least one stage",
                        hint=f"list at most {stages} GPU{'s' if stages > 1 else ''}, or build the decoder in "
                             f"{len(devices)} stages (decoder.stages: {len(devices)})")


def _cudart() -> Any:
    from polygraphy import cuda

    return cuda.wrapper().handle


def _check(status: Any, call: str) -> None:
    if int(status) != 0:
        raise RuntimeError(f"CUDA error {int(status)} in {call}")


_made_current = threading.local()  # per thread: the GPUs whose primary context this thread has made current


def select(index: Optional[int]) -> None:
    """Make GPU ``index`` current for the calling thread (``None``: leave the current one, as one-GPU serving does).

    The first time a thread selects a GPU, a ``cudaFree(NULL)`` makes its primary context current at once:
    before CUDA 12 ``cudaSetDevice`` only takes effect at the runtime's next call that needs a context, and
    TensorRT (its own CUDA runtime, linked in) sees only the driver's current context, so an engine
    deserialized right after the switch would land on the GPU before."""
    if index is None:
        return
    lib = _cudart()
    _check(lib.cudaSetDevice(ctypes.c_int(index)), f"cudaSetDevice({index})")
    made = getattr(_made_current, "gpus", None)
    if made is None:
        made = _made_current.gpus = set()
    if index not in made:
        _check(lib.cudaFree(ctypes.c_void_p(0)), f"cudaFree(NULL) on GPU {index}")
        made.add(index)


def current() -> int:
    """The calling thread's current GPU."""
    index = ctypes.c_int(0)
    _check(_cudart().cudaGetDevice(ctypes.byref(index)), "cudaGetDevice")
    return index.value


def device_count() -> int:
    """GPUs the CUDA runtime sees here (after ``CUDA_VISIBLE_DEVICES``).

    Raises:
        EnvironmentMissing: the runtime sees none (exit 4).
    """
    count = ctypes.c_int(0)
    status = int(_cudart().cudaGetDeviceCount(ctypes.byref(count)))
    if status != 0 or count.value < 1:
        raise EnvironmentMissing(f"no GPU here (cudaGetDeviceCount: error {status}, {count.value} devices)")
    return count.value


def check_devices(devices: Sequence[int], origin: str = "--devices") -> None:
    """Every listed GPU exists here.

    Raises:
        UserError: naming the first missing GPU and those that exist (exit 2).
    """
    count = device_count()
    missing = [d for d in devices if d >= count]
    if missing:
        raise UserError(f"{origin} {','.join(str(d) for d in devices)}: GPU {missing[0]} does not exist here "
                        f"({count} visible: {', '.join(str(d) for d in range(count))})",
                        hint="nvidia-smi lists them; CUDA_VISIBLE_DEVICES renumbers them from 0")


def compute_capability(index: int) -> str:
    """GPU ``index``'s compute capability as the engine sidecar records it (``9.0``), from the CUDA runtime,
    whose device numbers are the ones placement uses (nvidia-smi's order may differ)."""
    lib, values = _cudart(), []
    for attribute in (CC_MAJOR, CC_MINOR):
        value = ctypes.c_int(0)
        _check(lib.cudaDeviceGetAttribute(ctypes.byref(value), ctypes.c_int(attribute), ctypes.c_int(index)),
               "cudaDeviceGetAttribute")
        values.append(value.value)
    return f"{values[0]}.{values[1]}"


def enable_peer_access(device: int, peer: int) -> bool:
    """Let GPU ``device`` reach ``peer``'s memory directly (NVLink/PCIe), so a peer copy is not staged
    through the host. False where the pair cannot (the copies still work, through the host)."""
    lib, can = _cudart(), ctypes.c_int(0)
    _check(lib.cudaDeviceCanAccessPeer(ctypes.byref(can), ctypes.c_int(device), ctypes.c_int(peer)),
           "cudaDeviceCanAccessPeer")
    if not can.value:
        return False
    select(device)
    status = int(lib.cudaDeviceEnablePeerAccess(ctypes.c_int(peer), ctypes.c_uint(0)))
    if status == PEER_ACCESS_ALREADY_ENABLED:
        lib.cudaGetLastError()  # not sticky, but it stays the last error: clear it
    elif status != 0:
        _check(status, "cudaDeviceEnablePeerAccess")
    return True


class _Pos(ctypes.Structure):
    _fields_ = [("x", ctypes.c_size_t), ("y", ctypes.c_size_t), ("z", ctypes.c_size_t)]


class _PitchedPtr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("pitch", ctypes.c_size_t), ("xsize", ctypes.c_size_t),
                ("ysize", ctypes.c_size_t)]


class _Extent(ctypes.Structure):
    _fields_ = [("width", ctypes.c_size_t), ("height", ctypes.c_size_t), ("depth", ctypes.c_size_t)]


class Memcpy3DParms(ctypes.Structure):
    """CUDA's ``cudaMemcpy3DParms`` (unchanged since CUDA 3.x); linear memory only (no arrays)."""

    _fields_ = [("srcArray", ctypes.c_void_p), ("srcPos", _Pos), ("srcPtr", _PitchedPtr),
                ("dstArray", ctypes.c_void_p), ("dstPos", _Pos), ("dstPtr", _PitchedPtr),
                ("extent", _Extent), ("kind", ctypes.c_int)]


ALIGN = 256  # bytes: TensorRT wants every tensor address bound to a context 256-byte aligned (setTensorAddress)


def lines_for(rows: int, pitch: int) -> int:
    """Lines per plane: ``rows`` rounded up so that ``lines * pitch`` is a multiple of :data:`ALIGN`."""
    step = ALIGN // math.gcd(pitch, ALIGN)
    return -(-rows // step) * step


class Layout(NamedTuple):
    """``planes`` arrays of ``(rows, heads, columns, dim)`` one after another at ``ptr``: the KV cache's
    tensors (one plane per ``key.i``/``value.i``) in one allocation. A line is one head's ``columns``
    columns of ``dim`` values (``column_bytes`` each): line ``row * heads + head`` of plane ``z`` lies at
    ``ptr + (z * lines + row * heads + head) * pitch``, so a run of columns of a run of rows, every head
    and every plane, is one 3-D copy. ``lines`` is ``rows * heads`` padded so that every plane starts
    256-byte aligned, as TensorRT wants the addresses it is given."""

    ptr: int
    planes: int
    rows: int
    heads: int
    columns: int
    column_bytes: int

    @property
    def pitch(self) -> int:
        return self.columns * self.column_bytes

    @property
    def lines(self) -> int:
        return lines_for(self.rows * self.heads, self.pitch)

    @property
    def plane_bytes(self) -> int:
        return self.lines * self.pitch

    @property
    def nbytes(self) -> int:
        return self.planes * self.plane_bytes

    def plane(self, z: int) -> int:
        """The address of plane ``z`` (a ``(rows, heads, columns, dim)`` array)."""
        return self.ptr + z * self.plane_bytes


class Device:
    """One CUDA stream and the copies made on it (Polygraphy's wrapper; see the module docstring).

    Args:
        index: the GPU; made current before every allocation and enqueued call. ``None``: whichever
            GPU is current (one-GPU serving; no ``cudaSetDevice`` at all).

    Attributes:
        stream: the stream every engine call and copy of the serving side on this GPU is enqueued on, in order.
        traffic: bytes and calls per copy kind (``h2d``, ``d2h``, ``d2d``, ``peer``) since :meth:`reset`.
    """

    def __init__(self, index: Optional[int] = None) -> None:
        from polygraphy import cuda

        self.index = index
        self.cuda = cuda.wrapper()
        self.lib = self.cuda.handle
        self.activate()
        self.stream = cuda.Stream()
        self.capture_stream: Optional[int] = None  # made at the first CUDA graph capture (begin_capture)
        self._event = ctypes.c_void_p(0)  # created at the first wait_for that needs it, on this GPU
        self.traffic: Dict[str, int] = {}
        self.reset()

    def activate(self) -> None:
        """Make this GPU current for the calling thread (nothing for ``index`` None)."""
        select(self.index)

    def reset(self) -> None:
        self.traffic = {f"{k}_{what}": 0 for k in KINDS.values() for what in ("bytes", "calls")}

    def _count(self, kind: int, nbytes: int) -> None:
        self.traffic[f"{KINDS[kind]}_bytes"] += int(nbytes)
        self.traffic[f"{KINDS[kind]}_calls"] += 1

    _check = staticmethod(_check)

    # ---- memory -------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        self.activate()
        return int(self.cuda.malloc(max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        if ptr:
            self.activate()
            self.cuda.free(ptr)

    def memset(self, ptr: int, nbytes: int) -> None:
        """Zeros over ``nbytes`` at ``ptr`` (enqueued)."""
        if nbytes:
            self.activate()
            self._check(self.lib.cudaMemsetAsync(ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes),
                                                 ctypes.c_void_p(self.stream.ptr)), "cudaMemsetAsync")

    # ---- copies, enqueued on the stream. A copy from pageable host memory returns once CUDA has staged
    # the bytes (the array may go at once); one into pageable host memory returns once it is done. ----

    def upload(self, ptr: int, host: np.ndarray) -> None:
        """``host`` (C-contiguous) to ``ptr``."""
        self._linear(ptr, host.ctypes.data, host.nbytes, H2D)

    def download(self, host: np.ndarray, ptr: int) -> None:
        """``host.nbytes`` from ``ptr`` into ``host`` (C-contiguous); valid after :meth:`sync`."""
        self._linear(host.ctypes.data, ptr, host.nbytes, D2H)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device to device."""
        self._linear(dst, src, nbytes, D2D)

    def _linear(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if not nbytes:
            return
        self.activate()
        self._count(kind, nbytes)
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                             ctypes.c_int(kind), ctypes.c_void_p(self.stream.ptr)), "cudaMemcpyAsync")

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int, kind: int) -> None:
        """``height`` lines of ``width`` bytes, lines ``src_pitch`` apart at the source, ``dst_pitch`` at the target."""
        if not width or not height:
            return
        self.activate()
        self._count(kind, width * height)
        self._check(self.lib.cudaMemcpy2DAsync(
            ctypes.c_void_p(dst), ctypes.c_size_t(dst_pitch), ctypes.c_void_p(src), ctypes.c_size_t(src_pitch),
            ctypes.c_size_t(width), ctypes.c_size_t(height), ctypes.c_int(kind), ctypes.c_void_p(self.stream.ptr)),
            "cudaMemcpy2DAsync")

    def columns(self, dst: Layout, dst_row: int, dst_column: int, src: Layout, src_row: int, src_column: int,
                columns: int, rows: int = 1) -> None:
        """Columns ``[src_column, +columns)`` of rows ``[src_row, +rows)`` of ``src`` to columns from
        ``dst_column`` of rows from ``dst_row`` of ``dst``, every head of every plane, device to device,
        in one ``cudaMemcpy3DAsync``."""
        if not columns or not rows:
            return
        p = Memcpy3DParms()
        p.srcPos = _Pos(src_column * src.column_bytes, src_row * src.heads, 0)
        p.srcPtr = _PitchedPtr(src.ptr, src.pitch, src.pitch, src.lines)
        p.dstPos = _Pos(dst_column * dst.column_bytes, dst_row * dst.heads, 0)
        p.dstPtr = _PitchedPtr(dst.ptr, dst.pitch, dst.pitch, dst.lines)
        p.extent = _Extent(columns * src.column_bytes, rows * src.heads, src.planes)
        p.kind = D2D
        self.activate()
        self._count(D2D, columns * src.column_bytes * rows * src.heads * src.planes)
        self._check(self.lib.cudaMemcpy3DAsync(ctypes.byref(p), ctypes.c_void_p(self.stream.ptr)),
                    "cudaMemcpy3DAsync")

    # ---- two GPUs: a copy between them, and the order between their streams ----------------------

    def peer(self, dst: int, src: int, nbytes: int, source: Device) -> None:
        """``nbytes`` from ``src`` on ``source``'s GPU to ``dst`` on this one, enqueued on this stream
        (``cudaMemcpyPeerAsync``): order it after ``source``'s writes with :meth:`wait_for` first."""
        if not nbytes:
            return
        self.activate()
        self._count(PEER, nbytes)
        self._check(self.lib.cudaMemcpyPeerAsync(
            ctypes.c_void_p(dst), ctypes.c_int(self.index), ctypes.c_void_p(src), ctypes.c_int(source.index),
            ctypes.c_size_t(nbytes), ctypes.c_void_p(self.stream.ptr)), "cudaMemcpyPeerAsync")

    def wait_for(self, other: Device) -> None:
        """Work enqueued on this stream from now on starts after all work enqueued on ``other``'s stream so
        far (an event recorded there, waited for here; neither the host nor either GPU blocks)."""
        other.activate()
        if not other._event.value:
            self._check(self.lib.cudaEventCreateWithFlags(ctypes.byref(other._event),
                                                          ctypes.c_uint(EVENT_DISABLE_TIMING)), "cudaEventCreate")
        self._check(self.lib.cudaEventRecord(other._event, ctypes.c_void_p(other.stream.ptr)), "cudaEventRecord")
        self.activate()
        self._check(self.lib.cudaStreamWaitEvent(ctypes.c_void_p(self.stream.ptr), other._event, ctypes.c_uint(0)),
                    "cudaStreamWaitEvent")

    def sync(self) -> None:
        self.stream.synchronize()

    # ---- page-locked host memory and events: a download that does not wait (device_select) ----------

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory (``cudaHostAlloc``): a copy into it is asynchronous, unlike one into pageable
        memory, which waits for everything queued before it."""
        ptr = ctypes.c_void_p(0)
        self._check(self.lib.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1)), ctypes.c_uint(0)),
                    "cudaHostAlloc")
        return int(ptr.value)

    def host_free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFreeHost(ctypes.c_void_p(ptr))

    def download_to(self, host_ptr: int, ptr: int, nbytes: int) -> None:
        """``nbytes`` from ``ptr`` to page-locked ``host_ptr`` (enqueued; valid once an event recorded after it
        is reached)."""
        self._linear(host_ptr, ptr, nbytes, D2H)

    def event(self) -> Any:
        """A new event on this GPU (no timing)."""
        self.activate()
        event = ctypes.c_void_p(0)
        self._check(self.lib.cudaEventCreateWithFlags(ctypes.byref(event), ctypes.c_uint(EVENT_DISABLE_TIMING)),
                    "cudaEventCreate")
        return event

    def record(self, event: Any) -> None:
        """``event`` reached once everything enqueued on the stream so far is done."""
        self.activate()
        self._check(self.lib.cudaEventRecord(event, ctypes.c_void_p(self.stream.ptr)), "cudaEventRecord")

    def wait_event(self, event: Any) -> None:
        """Block the host until ``event`` is reached (what was enqueued after its record may still run)."""
        self._check(self.lib.cudaEventSynchronize(event), "cudaEventSynchronize")

    def destroy_event(self, event: Any) -> None:
        if event is not None and event.value:
            self.lib.cudaEventDestroy(event)

    # ---- CUDA graphs (:class:`~.device_cache.StepGraphs`): what is enqueued on the stream between the two
    # capture calls is recorded, not run; the returned executable runs it again on each launch ----------

    def begin_capture(self) -> int:
        """Begin capturing on this GPU's capture stream (made at the first capture: not the serving stream, which
        an encoder may use from another thread meanwhile); returns it, for the work to record."""
        self.activate()
        if self.capture_stream is None:  # non-blocking: the legacy stream's use elsewhere cannot break a capture
            stream = ctypes.c_void_p(0)
            self._check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(stream), ctypes.c_uint(STREAM_NON_BLOCKING)),
                        "cudaStreamCreateWithFlags")
            self.capture_stream = int(stream.value)
        self._check(self.lib.cudaStreamBeginCapture(ctypes.c_void_p(self.capture_stream),
                                                    ctypes.c_int(CAPTURE_LOCAL)), "cudaStreamBeginCapture")
        return self.capture_stream

    def end_capture(self) -> int:
        """End the capture :meth:`begin_capture` began: the executable graph of what it recorded (raises if CUDA
        refused something in it; the stream is out of capture mode either way). Launch it with :meth:`launch`."""
        self.activate()
        graph, exe = ctypes.c_void_p(0), ctypes.c_void_p(0)
        self._check(self.lib.cudaStreamEndCapture(ctypes.c_void_p(self.capture_stream), ctypes.byref(graph)),
                    "cudaStreamEndCapture")
        try:
            self._check(self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)),
                        "cudaGraphInstantiateWithFlags")
        finally:
            self.lib.cudaGraphDestroy(graph)
        return int(exe.value)

    def launch(self, graph: int) -> None:
        self.activate()
        self._check(self.lib.cudaGraphLaunch(ctypes.c_void_p(graph), ctypes.c_void_p(self.stream.ptr)),
                    "cudaGraphLaunch")

    def destroy_graph(self, graph: int) -> None:
        self.activate()
        self.lib.cudaGraphExecDestroy(ctypes.c_void_p(graph))

    def close(self) -> None:
        self.activate()
        if self._event.value:
            self.lib.cudaEventDestroy(self._event)
            self._event = ctypes.c_void_p(0)
        if self.capture_stream is not None:
            self.lib.cudaStreamDestroy(ctypes.c_void_p(self.capture_stream))
            self.capture_stream = None
        self.stream.free()


class Buffer:
    """A device allocation that grows (never shrinks) to what is asked of it: the scratch a step
    reuses. Growing frees the old memory (``cudaFree`` waits for the device), so it happens rarely:
    at the first steps of larger shapes."""

    def __init__(self, device: Device) -> None:
        self.device, self.ptr, self.nbytes = device, 0, 0

    def ensure(self, nbytes: int) -> int:
        """The buffer's address with room for ``nbytes`` (a real address even for 0: TensorRT is given one
        for empty tensors too, such as a prefill's zero-length past)."""
        if nbytes > self.nbytes or not self.ptr:
            self.device.free(self.ptr)
            self.ptr, self.nbytes = 0, 0
            self.ptr, self.nbytes = self.device.malloc(nbytes), max(int(nbytes), 1)
        return self.ptr

    def free(self) -> None:
        self.device.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


class DeviceEmbeds:
    """An encoder's output left on the GPU (``(count, hidden)`` or with a batch axis in front): what a
    :class:`~autoglm_build.runtime.text.Segment` carries on the TensorRT backend, spliced into the
    decoder's ``inputs_embeds`` by a device-to-device copy. ``numpy()`` (and ``np.asarray``) copy it
    to the host, for the code paths that want host arrays (ONNX Runtime never makes one)."""

    def __init__(self, device: Device, ptr: int, shape: Tuple[int, ...], dtype: Any, owner: Any = None) -> None:
        self.device, self.ptr, self.shape, self.dtype = device, int(ptr), tuple(int(d) for d in shape), np.dtype(dtype)
        self._owner = owner  # a view keeps its allocation alive

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, index: int) -> DeviceEmbeds:
        """Row ``index`` of the first axis (a view: ``audio_embeds[0]``)."""
        if not isinstance(index, int) or not 0 <= index < self.shape[0]:
            raise IndexError(index)
        row = self.nbytes // self.shape[0]
        return DeviceEmbeds(self.device, self.ptr + index * row, self.shape[1:], self.dtype, owner=self._owner or self)

    def numpy(self) -> np.ndarray:
        host = np.empty(self.shape, self.dtype)
        self.device.download(host, self.ptr)
        self.device.sync()
        return host

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    def __del__(self) -> None:
        if self._owner is None and self.ptr:
            try:  # the collector may run this in any thread, between another call's select and its launch
                if self.device.index is None:
                    self.device.free(self.ptr)
                else:
                    was = current()
                    self.device.free(self.ptr)
                    select(was)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the driver frees it anyway
                pass
            self.ptr = 0
