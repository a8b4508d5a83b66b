"""Typed build configuration, validated once at load.

A config file is YAML with the sections below; every field has the full-size model's value as its
default, so ``configs/autoglm-phone-9b.yaml`` states the architecture and the tiny config overrides
widths and depths only. Unknown fields are errors (a misspelt field must not silently keep its
default), and every error names the file and the dotted field.

The architecture is transformers' ``Glm4vConfig`` (GLM-4.1V-9B) for the vision tower and the text
decoder, and Whisper-large-v3's encoder (as GLM-4-Voice uses it) for speech, with a projector into
the decoder's width. ``docs/decisions.md`` says where each number comes from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autoglm_build.errors import ConfigError

SCHEMA_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Staged:
    """A module section with ``stages`` and ``head_stage`` fields (the decoder's, the vision tower's)."""

    @property
    def parts(self) -> int:
        """How many graphs the module is: its stages, and the head stage if it has one."""
        return self.stages + int(self.head_stage)  # type: ignore[attr-defined]


class VisionConfig(_Staged, _Section):
    """GLM-4.1V vision tower (``Glm4vVisionConfig``) over images at native resolution.

    ``image_size`` is the side the learned position table was trained at (24x24 patches at 336);
    served images are smart-resized within ``[min_pixels, max_pixels]`` as transformers'
    ``Glm4vImageProcessor`` does, and the table is interpolated to each image's patch grid.
    """

    depth: int = Field(24, ge=1)
    hidden_size: int = Field(1536, ge=8)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(13696, ge=1)
    out_hidden_size: int = Field(4096, ge=1, description="merger output; must equal text.hidden_size")
    patch_size: int = Field(14, ge=1)
    image_size: int = Field(336, ge=1, description="side of the learned position table's image, in pixels")
    min_pixels: int = Field(112 * 112, ge=1, description="smart_resize lower bound (processor's shortest_edge)")
    max_pixels: int = Field(5_000_000, ge=1, description="smart_resize upper bound (processor's longest_edge)")
    spatial_merge_size: int = Field(2, ge=1)
    temporal_patch_size: int = Field(2, ge=1)
    in_channels: int = Field(3, ge=1)
    rms_norm_eps: float = Field(1e-5, gt=0)
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    stages: int = Field(1, ge=1, description=(
        "contiguous ranges of the tower's layers (blocks), each its own graph, precision graph and engine "
        "(vision.stage0, ...): the first adds the patch embedding and positions, the last the merger; 1 = one graph. "
        "How the tower is built, not what it computes: left out of the vision graph's fingerprint"))
    head_stage: bool = Field(False, description=(
        "the final norm, 2x2 downsample and merger as a stage of their own after the block stages "
        "(vision.stage{stages}): hidden_states_in -> image_embeds, no attention. On TensorRT 8.5 the 9B's last "
        "stage with the merger built in 709 s against 501-520 s for the stages without it, the lease's critical path"))

    @property
    def grid(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Embeddings an ``image_size`` square image yields after the 2x2 merge."""
        return (self.grid // self.spatial_merge_size) ** 2

    @property
    def max_patches(self) -> int:
        """The most patches one image has at ``max_pixels`` (a multiple of the merge window)."""
        from autoglm_build.imaging import VisionGeometry

        return VisionGeometry.of(self).max_patches()


class TextConfig(_Section):
    """GLM-4.1V text decoder (``Glm4vTextConfig``): RMSNorm, GQA, 3-part (mrope) rotary positions."""

    hidden_size: int = Field(4096, ge=8)
    num_hidden_layers: int = Field(40, ge=1)
    num_attention_heads: int = Field(32, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(13696, ge=1)
    vocab_size: int = Field(151552, ge=2)
    rms_norm_eps: float = Field(1e-5, gt=0)
    hidden_act: str = "silu"
    rope_theta: float = Field(10000.0, gt=0)
    partial_rotary_factor: float = Field(0.5, gt=0, le=1)
    mrope_section: Tuple[int, int, int] = (8, 12, 12)
    max_position_embeddings: int = Field(65536, ge=1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class DecoderConfig(_Staged, _Section):
    """How the ``decoder`` module is built (not what it computes: that is ``text``)."""

    stages: int = Field(1, ge=1, description=(
        "contiguous layer ranges, each its own graph, precision graph and engine (decoder.stage0, ...): "
        "the first takes inputs_embeds, the last adds the final norm and LM head; 1 = one graph"))
    head_stage: bool = Field(False, description=(
        "the final norm and LM head as a stage of their own after the layer stages (decoder.stage{stages}): "
        "a small engine with no attention. On TensorRT 8.5 a layer stage holding the 151,552-row LM head did not "
        "build within a 30-minute lease at the agent's 25,480-token context, while the layer alone built in 157 s"))


class AudioConfig(_Section):
    """Whisper-large-v3 encoder (``WhisperConfig`` encoder half) plus a projector into the decoder.

    The projector stacks ``projector_stack`` consecutive encoder frames (25 Hz after Whisper's
    stride-2 conv, so 6.25 embeddings a second by default) and maps them with Linear-GELU-Linear
    to ``text.hidden_size``.
    """

    num_mel_bins: int = Field(128, ge=1)
    d_model: int = Field(1280, ge=8)
    encoder_layers: int = Field(32, ge=1)
    encoder_attention_heads: int = Field(20, ge=1)
    encoder_ffn_dim: int = Field(5120, ge=1)
    max_source_positions: int = Field(1500, ge=2, description="encoder positions; 2x this in mel frames")
    activation_function: str = "gelu"
    projector_stack: int = Field(4, ge=1)
    projector_hidden_size: Optional[int] = Field(None, ge=1, description="default: text.hidden_size")

    @property
    def max_frames(self) -> int:
        return 2 * self.max_source_positions

    @property
    def frame_multiple(self) -> int:
        """Mel frames must be a multiple of this (conv stride 2, then the projector's stacking)."""
        return 2 * self.projector_stack


class Tolerance(_Section):
    """Passes when ``max|a - b| <= atol + rtol * max|b|`` over the whole output (maxima, not element by
    element), b being the reference (PyTorch's output, or ONNX Runtime on the FP32 graph)."""

    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)


def _default_tolerances() -> Dict[str, Tolerance]:
    return {
        "vision": Tolerance(atol=1e-4, rtol=1e-3),
        "audio": Tolerance(atol=1e-4, rtol=1e-3),
        "embed": Tolerance(atol=0.0, rtol=0.0),
        "decoder": Tolerance(atol=1e-4, rtol=1e-3),
    }


class ExportConfig(_Section):
    """How modules become ONNX, and how each export is validated against PyTorch."""

    opset: int = Field(17, ge=14, le=23, description="17 is the newest TensorRT 8.5 parses")
    batch_sizes: List[int] = Field([1, 4, 8], min_length=1, description="ORT validation batches")
    max_batch: int = Field(8, ge=1, description="the batch axis' upper bound in the exported graph")
    decoder_seq_lens: List[int] = Field([7, 16], min_length=1, description="prefill lengths validated")
    decoder_decode_steps: int = Field(4, ge=1, description="decode steps validated after each prefill")
    audio_frames: List[int] = Field([400, 800], min_length=1, description="mel frames validated")
    logits: Literal["last", "all"] = Field(
        "last", description="decoder returns logits of the last position only, or of every position"
    )
    tolerances: Dict[str, Tolerance] = Field(default_factory=_default_tolerances)
    large_model_bytes: int = Field(
        1 << 30, ge=1, description="ONNX files whose weights exceed this keep them as external data"
    )


class OptimizeConfig(_Section):
    """Graph cleanup and fusions into standard ONNX ops (autoglm_build/rewrites/)."""

    opset: int = Field(17, ge=14, le=23, description="target opset: 17 for TensorRT 8.5; 20 fuses Gelu, 23 RMSNorm "
                       "and attention")
    rewrites: List[Literal["cleanup", "fuse-gelu", "fuse-rmsnorm", "fuse-attention", "scale-query-first"]] = Field(
        default_factory=lambda: ["cleanup", "fuse-gelu", "fuse-rmsnorm", "fuse-attention", "scale-query-first"],
        description="applied in this order",
    )
    tolerance: Tolerance = Field(default_factory=lambda: Tolerance(atol=1e-5, rtol=1e-5))


DEFAULT_FP16_PATTERNS = ["lm_head", "embed_tokens"]


class ModuleCalibration(_Section):
    """Per-module overrides of the precision policy."""

    int8: bool = Field(True, description="false keeps the whole module FP16 in the INT8 build")
    fp16_patterns: Optional[List[str]] = Field(None, description="replaces calibrate.fp16_patterns")


class AccuracyGate(_Section):
    """What a precision graph must reach against the FP32 graph on held-out samples (calibrate exits 3
    below it; ``verify --backend onnxruntime`` checks it)."""

    cosine: float = Field(0.99, ge=0, le=1, description="least mean cosine of the held-out samples' main output")
    greedy_agreement: float = Field(0.95, ge=0, le=1, description="decoder: least share of greedy next tokens "
                                    "equal to FP32's (gated with a checkpoint only: random logits are flat)")


class CalibrateConfig(_Section):
    """INT8/FP16 mixed precision on real calibration data (calibration_data/README.md)."""

    data: str = Field("calibration_data", description="calibration data directory; relative to the config file's "
                      "directory, like tokenizer")
    method: Literal["entropy", "minmax", "percentile"] = "entropy"
    percentile: float = Field(99.999, gt=90, lt=100)
    batches: int = Field(8, ge=1, description="calibration batches per module, at most")
    batch_size: int = Field(4, ge=1)
    holdout: float = Field(0.25, gt=0, lt=1, description="fraction of samples kept for the accuracy report")
    op_types: List[str] = Field(["MatMul", "Gemm", "Conv"], min_length=1, description="ops quantized to INT8")
    fp16_patterns: List[str] = Field(
        default_factory=lambda: list(DEFAULT_FP16_PATTERNS),
        description="nodes kept FP16: 'op:<OpType>' or a regex on the node name",
    )
    modules: Dict[str, ModuleCalibration] = Field(default_factory=dict)
    target_cosine: Optional[float] = Field(None, gt=0, le=1, description="sensitivity fallback target")
    gate: AccuracyGate = Field(default_factory=AccuracyGate)
    measure_fp16: bool = Field(True, description=(
        "calibrate --fp16 measures the FP16 graph against FP32 on held-out samples and holds it to the gate; "
        "false leaves that to verify (which compares the chained FP16 graphs with FP32 on its samples): a stage "
        "of a staged module is measured through the whole module after the stages before it, so 40 layers in 8 "
        "stages run the model on the CPU about 27 times, one stage after another, where without it the stages "
        "convert in parallel. INT8 is always measured (its FP16 fallback needs it)"))
    trt_version: str = Field("8.5.3", pattern=r"^\d+\.\d+(\.\d+)?$", description="calibration cache header")


def _default_engine_tolerances() -> Dict[str, Tolerance]:
    # An engine against ONNX Runtime on the graph it was built from (int8 engine vs the int8 graph),
    # relative to each output's scale: a faithful build, not the quantization error (calibrate.gate).
    return {
        "fp32": Tolerance(atol=1e-4, rtol=1e-3),
        "fp16": Tolerance(atol=1e-3, rtol=2e-2),
        "int8": Tolerance(atol=1e-2, rtol=5e-2),
    }


class EngineConfig(_Section):
    """TensorRT engines: profiles, workspace, timing cache, verification tolerances."""

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens per prefill call: ``prefill_chunk`` within the context."""
        return min(self.prefill_chunk, self.context)

    @property
    def prefill_rows(self) -> int:
        """Rows per prefill call: ``prefill_batch`` within ``max_batch``."""
        return min(self.prefill_batch or self.max_batch, self.max_batch)

    precision: Literal["fp16", "int8", "fp32"] = "fp16"
    max_batch: int = Field(8, ge=1)
    opt_batch: int = Field(4, ge=1)
    context: int = Field(25480, ge=2, description="decoder tokens (prompt + generated): the KV-cache bound "
                         "(25,480: the phone agent's reference deployment)")
    prefill_chunk: int = Field(4096, ge=1, description="most prompt tokens one prefill call takes (the prefill "
                               "profile's seq bound); longer prompts are prefilled in chunks")
    prefill_batch: Optional[int] = Field(
        None, ge=1, description="most rows one prefill call takes (the prefill profile's batch bound; the decode "
        "profile keeps engine.max_batch); default engine.max_batch. TensorRT 8.5 materializes attention scores "
        "(rows x heads x chunk x context), so a long context builds and fits only with few prefill rows")
    opt_seq: int = Field(64, ge=1, description="prefill length the profile is tuned for")
    opt_past: int = Field(256, ge=0, description="cache length the profile is tuned for")
    opt_audio_frames: int = Field(800, ge=8)
    max_patches: Optional[int] = Field(
        None, ge=4, description="vision patches per engine call (all images packed); default: one image at "
        "vision.max_pixels")
    opt_patches: Optional[int] = Field(None, ge=4, description="patch count the vision profile is tuned for; "
                                       "default: max_patches")
    workspace_mib: int = Field(4096, ge=64)
    preview_features: Optional[List[str]] = Field(
        None, description="TensorRT PreviewFeature names to enable; default: FASTER_DYNAMIC_SHAPES_0805 on "
        "TensorRT 8.5 (its dynamic-shape path for transformers), none on later versions; [] for none")
    timing_cache: Optional[str] = Field(
        None, description="directory of timing caches; default the user cache dir ($AUTOGLM_BUILD_CACHE_DIR overrides)"
    )
    tolerances: Dict[str, Tolerance] = Field(default_factory=_default_engine_tolerances)


class ServeConfig(_Section):
    """``autoglm-build serve``: the OpenAI-compatible server's defaults and limits."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("autoglm-phone-9b", min_length=1, description="the model id clients ask for")
    max_batch: int = Field(8, ge=1, description="decoder rows generated together (capped by the engines' profile)")
    queue_size: int = Field(128, ge=0, description="requests waiting for a batch slot; more get 429")
    max_tokens: int = Field(256, ge=1, description="default max_tokens of a request")
    thinking_budget: Optional[int] = Field(
        None, ge=0, description="reasoning tokens before </think> is forced; default half of max_tokens")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="request bodies above this get 413 "
                                "(10 full-size 1080x2400 PNG screenshots, base64, fit with room to spare)")
    max_media_per_request: int = Field(10, ge=0, description="images + audio clips in one request (vLLM's "
                                       "reference deployment allows 10 images)")
    prefix_cache_mib: int = Field(
        2048, ge=0, description="keys/values of prompt prefixes kept for reuse across requests (the phone agent's "
        "system prompt and history), least recently used out; 0 turns reuse off. 2,048 MiB: about 51K tokens "
        "of the 9B model's FP16 cache (40 KiB a token)")
    overlap: bool = Field(
        True, description="launch each decode step before the previous step's text work (detokenizing, stop "
        "strings, streaming), so the GPU runs while the host works (TensorRT; ONNX Runtime computes a step before "
        "it returns: no overlap); same tokens and text either way; false: one step after the other")
    cuda_graphs: bool = Field(
        True, description="run each decode step's engines as one CUDA graph per binding (TensorRT, one GPU): one "
        "launch instead of one enqueue per engine; same tokens either way (the GPU test). On an H200: the tiny "
        "server's decode 1.6x at 8 streams, the 40-layer server's 1.2x; false: engine by engine")
    device_select: bool = Field(
        True, description="choose each decode step's tokens on the GPU (TensorRT, one GPU: a select engine the server "
        "builds once per machine, runtime/device_select.py) and launch the next step on them before the host has "
        "them; greedy rows pick what the host sampler picks, sampled rows draw by Gumbel-max among the select_k most "
        "probable (seeded requests stay reproducible, with other tokens than the host sampler's); false: the host "
        "samples every step")
    cpu_threads: Optional[int] = Field(
        None, ge=1, description="ONNX Runtime's intra-op threads when serving on the CPU; default every core but one, "
        "which the event loop keeps for HTTP (on 2 cores the tiny decoder stepped 1.2x faster on one thread than on "
        "two, which the HTTP side took turns with)")
    cpu_affinity: bool = Field(
        True, description="when serving on the CPU (ONNX Runtime) with two cores or more: the scheduler's thread, "
        "which runs the graphs, on every core the process may use but the last, and the event loop (HTTP) on the "
        "last, the core cpu_threads leaves it, so neither runs on the other's (docs/benchmarks.md, eleventh "
        "session); false: the OS places them")
    stream_interval_ms: float = Field(
        5.0, ge=0, le=1000, description="a stream's chunks at most this often: the tokens generated meanwhile go out "
        "as one chunk (the first token at once, the same text; fewer chunks for the server to write and the client "
        "to parse: vLLM's stream_interval, in time). 5 ms: invisible to a reader, and the tiny server's median decode "
        "rate at 8 streams on an H200 rose from 8,165 to 9,700 tok/s; 0: a chunk per token as it comes. On ONNX "
        "Runtime the streams' chunks go out together before one of the scheduler's engine calls (a stream's second "
        "chunk may then follow its first by half the interval)")
    select_k: int = Field(
        64, ge=1, le=3840, description="candidates a sampled row draws from on the GPU (its top-p nucleus cut to the k "
        "most probable; 3,840: TensorRT's TopK limit)")
    devices: Optional[List[int]] = Field(
        None, min_length=1, description="GPUs the decoder's stages are placed on (TensorRT, pipeline parallel): stage "
        "i of N on devices[i * len(devices) // N], vision/audio/embed on the first; each GPU listed once, at most "
        "decoder.stages of them; serve --devices overrides it; default: the current GPU")

    @field_validator("devices")
    @classmethod
    def _distinct_gpus(cls, devices: Optional[List[int]]) -> Optional[List[int]]:
        if devices is not None:
            if any(d < 0 for d in devices):
                raise ValueError(f"GPU indices are 0 or more, not {min(devices)}")
            if len(set(devices)) != len(devices):
                raise ValueError(f"GPU {next(d for d in devices if devices.count(d) > 1)} listed twice")
        return devices


class BuildConfig(_Section):
    """The whole build: architecture, which modules to build, and how."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$",
                      description="the default workdir's name (build/<name>): no leading dot, so never '..'")
    seed: int = Field(0, ge=0, description="seed for random weights when no checkpoint is given")
    modules: List[str] = Field(["vision", "audio", "embed", "decoder"], min_length=1)
    checkpoint: Optional[str] = Field(None, description="local safetensors checkpoint directory")
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    calibrate: CalibrateConfig = Field(default_factory=CalibrateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tokenizer: Optional[str] = Field(
        None, description="tokenizer.json (relative to this config file); default: the checkpoint's"
    )

    @model_validator(mode="after")
    def _check_architecture(self) -> BuildConfig:
        for problem in _architecture_problems(self):
            raise ValueError(problem)
        return self

    def patch_range(self) -> Tuple[int, int, int]:
        """[min, opt, max] vision patches per engine call (all images packed together)."""
        top = self.engine.max_patches or self.vision.max_patches
        return self.vision.spatial_merge_size ** 2, min(self.engine.opt_patches or top, top), top

    def section(self, name: str) -> Dict[str, Any]:
        """One section as plain JSON-able data (what fingerprints hash)."""
        return json.loads(getattr(self, name).model_dump_json())


def _architecture_problems(cfg: BuildConfig) -> List[str]:
    """Cross-field rules the model code would otherwise fail on deep inside a forward pass."""
    v, t, a, e = cfg.vision, cfg.text, cfg.audio, cfg.export
    problems = []
    if cfg.decoder.stages > t.num_hidden_layers:
        problems.append(f"decoder.stages: {cfg.decoder.stages} exceeds text.num_hidden_layers {t.num_hidden_layers} "
                        "(each stage holds at least one layer)")
    if v.stages > v.depth:
        problems.append(f"vision.stages: {v.stages} exceeds vision.depth {v.depth} "
                        "(each stage holds at least one layer)")
    if v.hidden_size % v.num_heads:
        problems.append(f"vision.num_heads: {v.num_heads} does not divide vision.hidden_size {v.hidden_size}")
    elif (v.hidden_size // v.num_heads) % 4:
        problems.append("vision.num_heads: head size must be a multiple of 4 (2-D axial rotary positions)")
    if v.image_size % (v.patch_size * v.spatial_merge_size):
        problems.append(
            f"vision.image_size: {v.image_size} is not a multiple of patch_size x spatial_merge_size "
            f"({v.patch_size * v.spatial_merge_size})"
        )
    if v.min_pixels > v.max_pixels:
        problems.append(f"vision.min_pixels: {v.min_pixels} exceeds vision.max_pixels {v.max_pixels}")
    if v.max_patches < v.spatial_merge_size ** 2:
        problems.append(f"vision.max_pixels: {v.max_pixels} leaves no room for one merged patch")
    window = v.spatial_merge_size ** 2
    for field in ("max_patches", "opt_patches"):
        value = getattr(cfg.engine, field)
        if value is not None and value % window:
            problems.append(f"engine.{field}: {value} must be a multiple of {window} (the merge window)")
    if v.out_hidden_size != t.hidden_size:
        problems.append(f"vision.out_hidden_size: {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")
    if t.hidden_size % t.num_attention_heads:
        problems.append(
            f"text.num_attention_heads: {t.num_attention_heads} does not divide text.hidden_size {t.hidden_size}"
        )
    elif t.num_attention_heads % t.num_key_value_heads:
        problems.append(
            f"text.num_key_value_heads: {t.num_key_value_heads} does not divide "
            f"text.num_attention_heads {t.num_attention_heads}"
        )
    else:
        rotary_half = int(t.head_dim * t.partial_rotary_factor) // 2
        if sum(t.mrope_section) != rotary_half:
            problems.append(
                f"text.mrope_section: sums to {sum(t.mrope_section)}, must be head_dim x "
                f"partial_rotary_factor / 2 = {rotary_half}"
            )
    if a.d_model % a.encoder_attention_heads:
        problems.append(
            f"audio.encoder_attention_heads: {a.encoder_attention_heads} does not divide audio.d_model {a.d_model}"
        )
    for frames in e.audio_frames:
        if frames % a.frame_multiple or frames > a.max_frames:
            problems.append(
                f"export.audio_frames: {frames} must be a multiple of {a.frame_multiple} and at most {a.max_frames}"
            )
    if max(e.batch_sizes) > e.max_batch or min(e.batch_sizes) < 1:
        problems.append(f"export.batch_sizes: each must lie in [1, export.max_batch={e.max_batch}]")
    g = cfg.engine
    if not 1 <= g.opt_batch <= g.max_batch:
        problems.append(f"engine.opt_batch: {g.opt_batch} must lie in [1, engine.max_batch={g.max_batch}]")
    if g.prefill_batch is not None and g.prefill_batch > g.max_batch:
        problems.append(f"engine.prefill_batch: {g.prefill_batch} exceeds engine.max_batch {g.max_batch}")
    elif max(e.batch_sizes) > g.prefill_rows:  # verify prefills its samples at each of them on the engine
        problems.append(f"export.batch_sizes: {max(e.batch_sizes)} exceeds engine.prefill_batch {g.prefill_rows} "
                        "(verify prefills a sample at each batch size)")
    if g.opt_seq > g.prefill_tokens:  # name the field that bounds it: the chunk, or a context below it
        bound = "engine.prefill_chunk" if g.prefill_chunk <= g.context else "engine.context"
        problems.append(f"engine.opt_seq: {g.opt_seq} exceeds {bound} {g.prefill_tokens}")
    if g.opt_seq + g.opt_past > g.context:
        problems.append(
            f"engine.opt_seq + engine.opt_past ({g.opt_seq + g.opt_past}) exceed engine.context {g.context}")
    if g.max_batch > e.max_batch:
        problems.append(f"engine.max_batch: {g.max_batch} exceeds export.max_batch {e.max_batch}")
    if cfg.optimize.opset < e.opset:
        problems.append(f"optimize.opset: {cfg.optimize.opset} is below export.opset {e.opset} (opsets only go up)")
    if any(n < 1 for n in e.decoder_seq_lens):
        problems.append("export.decoder_seq_lens: each must be at least 1")
    return problems


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path, overrides: Optional[Dict[str, Any]] = None) -> BuildConfig:
    """Read and validate a YAML config.

    Args:
        path: The YAML file.
        overrides: Top-level fields to set after reading (e.g. ``{"checkpoint": "..."}``).

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: one line naming the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", hint="pass -c configs/<name>.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    data.update(overrides or {})
    for field in ("tokenizer", "checkpoint"):
        if isinstance(data.get(field), str):
            data[field] = str((path.parent / data[field]).resolve())
    _resolve_data_dir(data, path.parent)
    try:
        cfg = BuildConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc)}") from None
    _check_module_names(path, cfg)
    return cfg


def _resolve_data_dir(data: Dict[str, Any], base: Path) -> None:
    """``calibrate.data`` (given or default) made absolute against the config file's directory, so a
    command run from any directory reads the same files (and the manifest records where)."""
    section = data.get("calibrate", {})
    if not isinstance(section, dict):
        return  # validation names the field
    where = section.get("data", CalibrateConfig.model_fields["data"].default)
    if isinstance(where, str):
        data["calibrate"] = {**section, "data": str((base / where).resolve())}


def _check_module_names(path: Path, cfg: BuildConfig) -> None:
    from autoglm_build.modules import registry

    for name in cfg.modules:
        if name not in registry.names():
            raise ConfigError(f"{path}: modules: unknown module '{name}'; valid: {', '.join(registry.names())}")
    for field, names in (("export.tolerances", cfg.export.tolerances), ("calibrate.modules", cfg.calibrate.modules)):
        for name in names:
            if name not in registry.names():
                raise ConfigError(f"{path}: {field}.{name}: unknown module; valid: {', '.join(registry.names())}")


def format_validation_error(exc: ValidationError) -> str:
    """One line for the first error of a pydantic ``ValidationError``: ``field.path: what is wrong``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = _fields_at(err["loc"][:-1])
        return f"{loc}: unknown field; valid fields here: {', '.join(valid)}{more}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and not loc:
        return f"{msg}{more}"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{loc or 'config'}: {msg}{shown}{more}"


def _fields_at(loc: Tuple[Any, ...]) -> List[str]:
    """The field names valid at a location inside ``BuildConfig`` (for unknown-field messages)."""
    model: Any = BuildConfig
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        keyed = {(ExportConfig, "tolerances"): Tolerance, (CalibrateConfig, "modules"): ModuleCalibration}
        if (model, part) in keyed:
            if not parts:
                return []
            parts.pop(0)  # the module name keying the dict
            model = keyed[(model, part)]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)
