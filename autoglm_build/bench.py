"""``autoglm-build bench``: latency and throughput per module, backend and batch, side by side.

Backends, on the same inputs in one run:

- ``tensorrt``: the build's engines (fp16 and int8 where built), bound to inputs put on the GPU
  beforehand (:meth:`~autoglm_build.runtime.backends.TensorRTBackend.device_call`): each timed call
  is one enqueue, outputs left on the GPU, as the torch side's eager call leaves them.
- ``onnxruntime``: the FP32 graph (CUDA provider where installed, else CPU).
- ``torch``: the same modules in PyTorch eager with the same weights (seeded or the checkpoint's),
  fp16 on a GPU, fp32 on a CPU.

Cases: vision at each batch of ``image_size`` images and one 1080x2400 phone screenshot at native
resolution (torch runs transformers' ``Glm4vVisionModel`` itself with sdpa attention, the baseline
users run); audio at each batch; the decoder's prefill of ``--prompt`` tokens (time to first
token) and one decode step at a ``--past``-token cache (per-token latency); embed at each batch.
Each case: warm-up, then iterations until ``--min-time`` seconds (at least ``--iters``), each timed
with a synchronized clock; p50/p90/p99 latency and items/s.

Floors (GPU only, measured in the same run with torch): the decode step's bytes of weights and KV
cache over the measured device-to-device copy bandwidth, and the vision encoder's and the decoder
prefill's FLOPs over the measured fp16 matmul rate. ``ratio`` = measured p50 / floor.

Extrapolation (``extrapolate_to``, e.g. the 9B config beside its 2-layer slice): each row's p50 times
the full model's work over the slice's for the same case — bytes for a decode step, FLOPs for a
prefill or an image pack — i.e. every layer and the head run at the efficiency the slice measured.
A slice's LM head and embedding are already full size, so this is not the naive layers ratio.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.errors import UserError
from autoglm_build.manifest import Manifest, StageRecord
from autoglm_build.modules import registry
from autoglm_build.runtime.kv_cache import CacheSpec

Feed = Dict[str, np.ndarray]
BACKENDS = ("tensorrt", "torch", "onnxruntime")
ALIASES = {"trt": "tensorrt", "ort": "onnxruntime", "pytorch": "torch"}


# ---- analytic sizes ------------------------------------------------------------------------------


def decoder_parameters(cfg: BuildConfig) -> int:
    """Decoder + LM head parameters (GLM-4: q/k/v with bias, fused gate-up MLP, four norms a layer)."""
    t = cfg.text
    h, kv, ffn = t.hidden_size, t.num_key_value_heads * t.head_dim, t.intermediate_size
    q = t.num_attention_heads * t.head_dim
    layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * ffn + 4 * h
    return t.num_hidden_layers * layer + h + t.vocab_size * h


def decode_step_bytes(cfg: BuildConfig, batch: int, past: int, precision: str) -> int:
    """Bytes one decode step must read: every weight once, and the batch's KV cache."""
    weight_bytes = {"fp32": 4, "fp16": 2, "int8": 1}[precision]
    cache_bytes = 4 if precision == "fp32" else 2
    return decoder_parameters(cfg) * weight_bytes + CacheSpec.of(cfg.text).bytes(batch * past, cache_bytes)


def vision_flops(cfg: BuildConfig, patches: Sequence[int]) -> int:
    """Matmul FLOPs of a pack of images (``patches`` per image) through the vision tower (2 per
    multiply-add); attention is quadratic in each image's own patches."""
    v = cfg.vision
    d, i, out, window = v.hidden_size, v.intermediate_size, v.out_hidden_size, v.spatial_merge_size ** 2
    macs = 0
    for s in patches:
        macs += s * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * d  # patch embedding
        macs += v.depth * (4 * s * d * d + 2 * s * s * d + 3 * s * d * i)  # qkv+proj, attention, SwiGLU MLP
        macs += s // window * (window * d * out + out * out + 3 * out * i)  # downsample + merger
    return 2 * macs


def decoder_prefill_flops(cfg: BuildConfig, batch: int, new: int, past: int) -> int:
    """Matmul FLOPs of prefilling ``new`` tokens after ``past`` cached ones (2 per multiply-add): the
    layers' projections and MLP per new token, attention over all ``past + new`` positions, and the
    LM head on the last position only (``export.logits: last``)."""
    t = cfg.text
    h, kv, ffn = t.hidden_size, t.num_key_value_heads * t.head_dim, t.intermediate_size
    q = t.num_attention_heads * t.head_dim
    per_token = h * q + 2 * h * kv + q * h + 3 * h * ffn
    attention = 2 * new * (past + new) * q  # scores and the weighted sum
    return 2 * batch * (t.num_hidden_layers * (new * per_token + attention) + h * t.vocab_size)


def case_work(cfg: BuildConfig, module: str, case: Dict[str, Any]) -> Optional[float]:
    """What bounds a case's time: bytes a decode step reads, or FLOPs of a prefill or image pack."""
    feed = case["feed"]
    if module == "decoder":
        past = feed["past_key.0"].shape[2]
        if case["phase"] == "decode":
            return float(decode_step_bytes(cfg, case["batch"], past, "fp16"))
        return float(decoder_prefill_flops(cfg, case["batch"], feed["inputs_embeds"].shape[1], past))
    if module == "vision":
        from autoglm_build.imaging import unpack

        return float(vision_flops(cfg, [img.patches for img in unpack(feed)]))
    return None


#: the phone agent's image: one full-size Android screenshot (width x height)
SCREENSHOT = (1080, 2400)


def screenshot_feed(cfg: BuildConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """One 1080x2400 screenshot's vision inputs at the config's ``max_pixels`` (within the engine's bound)."""
    from autoglm_build.imaging import smart_resize
    from autoglm_build.runtime.media import image_geometry

    height, width = smart_resize(SCREENSHOT[1], SCREENSHOT[0], image_geometry(cfg))
    return registry.get("vision").random_images(cfg, rng, [(height, width)])


# ---- cases ---------------------------------------------------------------------------------------


def cases(cfg: BuildConfig, module: str, batches: Sequence[int], prompt: int, past: int,
          prefix: int = 0) -> List[Dict[str, Any]]:
    """``{name, batch, feed, phase, items}`` for one module (``prefix``: also the decoder's prefill of
    ``prompt`` new tokens after a cached prefix of that many, the phone agent's step). The decoder's
    prefill cases only at batches its prefill profile takes (``engine.prefill_batch``)."""
    spec = registry.get(module)
    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        if module == "decoder":
            prefills = b <= cfg.engine.prefill_rows
            if prefills:
                out.append({"case": f"prefill {prompt}", "batch": b, "phase": "prefill", "items": b,
                            "feed": spec.step_inputs(cfg, rng, b, prompt, past=0),
                            "chunks": prefill_chunks(cfg, b, prompt, 0)})
            out.append({"case": f"decode @{past}", "batch": b, "phase": "decode", "items": b,
                        "feed": spec.step_inputs(cfg, rng, b, 1, past=past)})
            if prefix and prefills:
                out.append({"case": f"prefill {prompt} after {prefix}", "batch": b, "phase": "prefill",
                            "items": b, "feed": spec.step_inputs(cfg, rng, b, prompt, past=prefix),
                            "chunks": prefill_chunks(cfg, b, prompt, prefix)})
        elif module == "embed":
            out.append({"case": f"seq {prompt}", "batch": b, "phase": "prefill", "items": b * prompt,
                        "feed": {"input_ids": spec.token_ids(cfg, rng, b, prompt)}})
        elif module == "audio":
            frames = cfg.engine.opt_audio_frames
            out.append({"case": f"{frames} frames", "batch": b, "phase": "prefill", "items": b,
                        "feed": {"input_features": spec.features(cfg, rng, b, frames)}})
        else:
            if b == 1:
                feed = screenshot_feed(cfg, rng)
                out.append({"case": "screenshot {}x{} ({} patches)".format(*SCREENSHOT, len(feed["patch_pos"])),
                            "batch": 1, "phase": "prefill", "items": 1, "feed": feed})
            size = cfg.vision.image_size
            out.append({"case": f"{size}px", "batch": b, "phase": "prefill", "items": b,
                        "feed": spec.random_images(cfg, rng, [(size, size)] * b)})
    return out


def prefill_chunks(cfg: BuildConfig, batch: int, prompt: int, past: int) -> Optional[List[Feed]]:
    """A prompt longer than the prefill profile (``engine.prefill_chunk``) as the server prefills it:
    chunks of at most that many tokens, each after the cache the earlier ones left; None when one call
    takes it. Engines are bound by the profile and run these; ONNX Runtime and torch run ``feed`` whole."""
    chunk = cfg.engine.prefill_tokens
    if prompt <= chunk:
        return None
    rng, spec = np.random.default_rng(1), registry.get("decoder")
    return [spec.step_inputs(cfg, rng, batch, min(chunk, prompt - start), past=past + start)
            for start in range(0, prompt, chunk)]


def find_case(cfg: BuildConfig, module: str, batch: int, name: str, prompt: int = 512,
              past: int = 512) -> Dict[str, Any]:
    """The first of the module's cases at ``batch`` whose name contains ``name`` (e.g. "decode").

    Raises:
        UserError: no case of the module has that name.
    """
    found = cases(cfg, module, [batch], prompt, past)
    for case in found:
        if name in case["case"]:
            return case
    raise UserError(f"{module}: no bench case named like '{name}' (cases: {', '.join(c['case'] for c in found)})")


def timed(fn: Callable[[], Any], sync: Callable[[], None], warmup: int, iters: int, min_time: float) -> List[float]:
    """Per-iteration seconds with a synchronized clock (``sync`` waits for the device)."""
    for _ in range(warmup):
        fn()
    sync()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * iters and time.perf_counter() - start >= min_time:
            break
    return times


# ---- backends ------------------------------------------------------------------------------------


class _Runner:
    """A backend/precision bound to a module: ``prepare(case)`` returns a zero-argument call."""

    label = ""
    sync: Callable[[], None] = staticmethod(lambda: None)

    def prepare(self, case: Dict[str, Any]) -> Callable[[], Any]:
        raise NotImplementedError


class _Runtime(_Runner):
    def __init__(self, backend, module: str) -> None:
        self.backend, self.module = backend, module
        self.label = f"{backend.name} {backend.precision}"

    def prepare(self, case):
        feed, phase = case["feed"], case["phase"]
        if case.get("chunks") and hasattr(self.backend, "device_chain"):  # beyond the prefill profile
            bound = self.backend.device_chain(self.module, case["chunks"], phase)
            self.sync = bound.sync
            return bound.call
        if hasattr(self.backend, "device_call"):  # TensorRT: inputs on the GPU beforehand, as torch's
            bound = self.backend.device_call(self.module, feed, phase)
            self.sync = bound.sync
            return bound.call
        return lambda: self.backend.run(self.module, feed, phase)


class _Torch(_Runner):
    """PyTorch eager on the module the export stage builds (same weights), fp16 on CUDA."""

    def __init__(self, cfg: BuildConfig, workdir: Path, module: str) -> None:
        import torch

        from autoglm_build.stages.base import StageContext
        from autoglm_build.stages.export import ExportStage

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        ctx = StageContext(cfg, workdir, Manifest())
        stage = ExportStage(Path(cfg.checkpoint) if cfg.checkpoint else None)
        model = stage.build_module(ctx, registry.get(module))[0]
        self.model = model.to(self.device, self.dtype).eval()
        self.attention = "sdpa" if module == "vision" else "eager"
        self.module, self.names = module, registry.get(module).input_names(cfg)
        # the label's last word is the precision; vision runs transformers' own forward with sdpa
        precision = "fp16" if self.dtype == torch.float16 else "fp32"
        self.label = f"torch{' sdpa' if self.attention == 'sdpa' else ''} {precision}"
        if self.device == "cuda":
            self.sync = torch.cuda.synchronize

    def with_sdpa(self) -> _Torch:
        """The decoder on the same weights with transformers' sdpa attention (the fused kernels a
        torch deployment gets) instead of the eager attention the export traces."""
        import copy

        twin = copy.copy(self)
        twin.attention, twin.label = "sdpa", self.label.replace("torch", "torch sdpa", 1)
        return twin

    def prepare(self, case):
        torch = self.torch
        if self.module == "vision":
            return self._vision(case["feed"])
        args = []
        for name in self.names:
            value = torch.from_numpy(case["feed"][name]).to(self.device)
            args.append(value.to(self.dtype) if value.is_floating_point() else value)

        hf_config = getattr(getattr(self.model, "language_model", None), "config", None)

        def call():
            if hf_config is not None:  # the layers read it at each call; the eager and sdpa rows share the model
                hf_config._attn_implementation = self.attention
            with torch.inference_mode():
                return self.model(*args)

        return call

    def _vision(self, feed: Feed) -> Callable[[], Any]:
        """transformers' ``Glm4vVisionModel(pixel_values, grid_thw)`` with sdpa attention (cu_seqlens per image)."""
        from autoglm_build.imaging import unpack

        torch, visual = self.torch, self.model.visual
        visual.config._attn_implementation = "sdpa"
        pixels = torch.from_numpy(feed["pixel_values"]).to(self.device, self.dtype)
        grid = torch.tensor([[1, img.rows, img.cols] for img in unpack(feed)], device=self.device)

        def call():
            with torch.inference_mode():
                return visual(pixels, grid).pooler_output

        return call


def _runners(cfg: BuildConfig, workdir: Path, module: str, backends: Sequence[str],
             precisions: Sequence[str], notes: List[str]) -> List[_Runner]:
    from autoglm_build.engine import tensorrt as trt_env
    from autoglm_build.parts import module_parts
    from autoglm_build.runtime.backends import OnnxRuntimeBackend, TensorRTBackend, engine_artifact

    manifest = Manifest.load(workdir)
    out: List[_Runner] = []
    for name in backends:
        if name == "tensorrt":
            if not trt_env.available():
                notes.append("tensorrt skipped: TensorRT is not installed here")
                continue
            for precision in precisions:
                parts = module_parts(manifest.config, module)
                missing = [p for p in parts if engine_artifact(manifest, p, precision) is None]
                if missing:  # a staged module needs every stage's engine
                    notes.append(f"{missing[0]}: no {precision} engine; tensorrt {precision} skipped")
                    continue
                out.append(_Runtime(TensorRTBackend(workdir, manifest, [module], precision), module))
        elif name == "onnxruntime":
            out.append(_Runtime(OnnxRuntimeBackend(workdir, manifest, [module], "fp32"), module))
        elif name == "torch":
            try:
                out.append(_Torch(cfg, workdir, module))
                if module.startswith("decoder") and out[-1].device == "cuda":
                    out.append(out[-1].with_sdpa())
            except ImportError:
                notes.append("torch skipped: PyTorch/transformers are not installed here")
    return out


# ---- device peaks --------------------------------------------------------------------------------


def measure_peaks() -> Optional[Dict[str, Any]]:
    """Device-to-device copy bandwidth (bytes read + written per second) and fp16 matmul FLOP/s, with
    torch on CUDA; None without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), torch.cuda.synchronize, 3, 20, 0.5)
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    b = torch.randn_like(a)
    mm = timed(lambda: a @ b, torch.cuda.synchronize, 3, 20, 0.5)
    return {"gpu": torch.cuda.get_device_name(0), "copy_bytes_per_s": 2 * n / float(np.median(copy)),
            "matmul_flops_per_s": 2 * 8192 ** 3 / float(np.median(mm))}


# ---- the command ---------------------------------------------------------------------------------


def bench(cfg: BuildConfig, workdir: Path, modules: Sequence[str], batches: Sequence[int], backends: Sequence[str],
          precisions: Sequence[str] = ("fp16", "int8"), prompt: int = 512, past: int = 512, warmup: int = 3,
          iters: int = 10, min_time: float = 1.0, status: Callable[[str], None] = lambda m: None,
          prefix: int = 0, extrapolate_to: Optional[BuildConfig] = None) -> Dict[str, Any]:
    """Rows per module/case/batch/backend, device peaks and floors; stored in the manifest. With
    ``extrapolate_to``, each row also gets ``full_ms``: its p50 scaled to that config's depth
    (:func:`case_work`)."""
    workdir = Path(workdir)
    backends = [ALIASES.get(name, name) for name in backends]
    for name in backends:
        if name not in BACKENDS:
            raise UserError(f"--backends: '{name}' is not one of {', '.join(BACKENDS)} "
                            f"(or {', '.join(ALIASES)})")
    manifest = Manifest.load(workdir)
    if not manifest.artifacts:
        raise UserError(f"{workdir}: no build here (manifest.json missing or empty)", hint="run `autoglm-build run`")
    if past + 1 > cfg.engine.context or prompt + prefix > cfg.engine.context:
        raise UserError(f"--prompt {prompt} / --past {past} / --prefix {prefix}: beyond engine.context "
                        f"{cfg.engine.context}")
    notes: List[str] = []
    status("measuring device peaks")
    peaks = measure_peaks()
    previous = manifest.record("bench", "_device")
    if peaks is None and previous is not None and previous.metrics.get("peaks"):
        peaks = previous.metrics["peaks"]  # the torch side of this device run measured them
        notes.append(f"device peaks from the earlier `bench` on {peaks['gpu']} in this workdir")
    rows: List[Dict[str, Any]] = []
    for module in modules:
        for runner in _runners(cfg, workdir, module, backends, precisions, notes):
            for case in cases(cfg, module, batches, prompt, past, prefix):
                status(f"{module} {case['case']} batch {case['batch']}: {runner.label}")
                times = timed(runner.prepare(case), runner.sync, warmup, iters, min_time)
                p50, p90, p99 = (float(np.percentile(times, q)) for q in (50, 90, 99))
                row = {"module": module, "case": case["case"], "batch": case["batch"], "backend": runner.label,
                       "p50_ms": 1e3 * p50, "p90_ms": 1e3 * p90, "p99_ms": 1e3 * p99, "iters": len(times),
                       "items_per_s": case["items"] / p50, "floor_ms": None, "ratio": None}
                if case.get("chunks") and runner.label.startswith("tensorrt"):
                    row["calls"] = len(case["chunks"])
                    notes.append(f"tensorrt ran '{case['case']}' as {len(case['chunks'])} prefill calls of at most "
                                 f"{cfg.engine.prefill_tokens} tokens (engine.prefill_chunk), each after the cache "
                                 f"of the ones before; the other backends in one call")
                floor = _floor(cfg, module, case, runner.label.split()[-1], peaks)
                if floor is not None:
                    row.update(floor_ms=1e3 * floor, ratio=p50 / floor)
                if extrapolate_to is not None and case_work(cfg, module, case):
                    scale = case_work(extrapolate_to, module, case) / case_work(cfg, module, case)
                    row["full_ms"] = 1e3 * p50 * scale
                    if floor is not None:
                        row["full_floor_ms"] = 1e3 * floor * scale
                rows.append(row)
            if hasattr(runner, "backend"):
                runner.backend.close()
    notes = list(dict.fromkeys(notes))  # once each, not once per module
    report = {"config": cfg.name, "workdir": str(workdir), "peaks": peaks, "rows": rows, "notes": notes,
              "prompt": prompt, "past": past, "full_config": extrapolate_to.name if extrapolate_to else None}
    _store(manifest, workdir, report)
    # Side by side with what other runs stored here (the torch side measured on another Python).
    ran = {(r["module"], r["case"], r["batch"], r["backend"]) for r in rows}
    records = [manifest.record("bench", module) for module in modules]
    report["stored_rows"] = [
        r for rec in records if rec for r in rec.metrics.get("rows", [])
        if (r["module"], r["case"], r["batch"], r["backend"]) not in ran and r["batch"] in batches
    ]
    return report


def _floor(cfg: BuildConfig, module: str, case: Dict[str, Any], precision: str,
           peaks: Optional[Dict[str, Any]]) -> Optional[float]:
    if not peaks:
        return None
    if module == "decoder" and case["phase"] == "decode":
        past = case["feed"]["past_key.0"].shape[2]
        return decode_step_bytes(cfg, case["batch"], past, precision) / peaks["copy_bytes_per_s"]
    if module in ("decoder", "vision"):  # a prefill or an image pack: compute-bound
        return case_work(cfg, module, case) / peaks["matmul_flops_per_s"]
    return None


def _store(manifest: Manifest, workdir: Path, report: Dict[str, Any]) -> None:
    """Rows merge into the ``bench`` records by (case, batch, backend): the latest measurement wins.
    The merge happens under the manifest's lock, onto what another process may have stored meanwhile
    (the TensorRT side on the harness's Python, the torch side on another)."""

    def merge(fresh: Manifest) -> None:
        if report["peaks"]:
            fresh.put(StageRecord(stage="bench", module="_device", status="done", fingerprint="",
                                  started=time.time(), metrics={"peaks": report["peaks"]}), [])
        for module in sorted({r["module"] for r in report["rows"]}):
            old = fresh.record("bench", module)
            rows = {(r["case"], r["batch"], r["backend"]): r for r in (old.metrics.get("rows", []) if old else [])}
            rows.update({(r["case"], r["batch"], r["backend"]): r for r in report["rows"] if r["module"] == module})
            fresh.put(StageRecord(stage="bench", module=module, status="done", fingerprint="", started=time.time(),
                                  metrics={"rows": list(rows.values())}), [])

    manifest.update(workdir, merge)
