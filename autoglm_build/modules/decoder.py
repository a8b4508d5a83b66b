"""``decoder``: the GLM-4.1V text decoder and LM head over ``inputs_embeds``, with an explicit KV cache.

One graph serves both prefill (``past_seq`` = 0, ``seq`` = N) and decode (``seq`` = 1, ``past_seq``
= tokens so far): the cache enters as ``past_key.{i}``/``past_value.{i}`` and leaves, extended by
``seq`` positions, as ``present_key.{i}``/``present_value.{i}``. The layers are transformers'
``Glm4vTextDecoderLayer`` (same state-dict keys as ``Glm4vTextModel``); only the cache object is
ours, a list of tensors instead of ``DynamicCache`` so that it traces into graph inputs/outputs.

Inputs (B = batch, S = seq, P = past_seq, T = P + S):

- ``inputs_embeds`` float32 (B, S, hidden): token embeddings with image/audio embeddings spliced in
- ``attention_mask`` int64 (B, T): 1 for real tokens, 0 for padding (left padding when batching)
- ``position_ids`` int64 (B, 3, S): GLM-4.1V's 3-part (temporal, height, width) rotary positions;
  the three rows are equal for text
- ``past_key.{i}``, ``past_value.{i}`` float32 (B, kv_heads, P, head_dim)

With ``decoder.stages`` > 1 the decoder is built as stages (:class:`DecoderStageSpec`,
``decoder.stage0`` ...), contiguous layer ranges chained through ``hidden_states`` (B, S, hidden);
:mod:`autoglm_build.parts` says how the build and the runtime treat them.

Outputs: ``logits`` float32 (B, vocab) for the last position (``export.logits: last``, the default:
what generation needs, and 2048x less memory at full vocab) or (B, S, vocab) with ``all``; and the
``present_*`` tensors (B, kv_heads, T, head_dim).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from autoglm_build.config import BuildConfig
from autoglm_build.modules.base import Case, ModuleSpec, Patch, StagePart, batched, npz_feeds, random_floats
from autoglm_build.modules.registry import register
from autoglm_build.parts import HIDDEN, HIDDEN_IN, chain, layer_ranges, ort_part, part_name


def _torch_module():
    import torch
    from torch import nn
    from transformers.models.glm4v.modeling_glm4v import Glm4vTextModel

    class ExplicitCache:
        """The part of transformers' ``Cache`` that ``Glm4vTextAttention`` calls: ``update``."""

        def __init__(self, past: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> None:
            self.past = past  # by the layer's global index (a stage holds a range of layers)
            self.present: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

        def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
            past_key, past_value = self.past[layer_idx]
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)
            self.present[layer_idx] = (key, value)
            return key, value

    class TextDecoder(nn.Module):
        """``Glm4vTextModel`` layers + final norm + LM head, cache in and out as tensors.

        ``layers`` (a stage of a staged decoder) keeps only that range of layers, at their global
        indices (state-dict keys and cache names stay the unstaged decoder's); ``final`` False
        leaves out the final norm and LM head and returns the hidden states of every position.
        The whole decoder is built first, so a stage's weights are the unstaged decoder's.
        """

        def __init__(self, hf_text_config: Any, vocab_size: int, last_logits_only: bool,
                     layers: Optional[range] = None, final: bool = True) -> None:
            super().__init__()
            # The embedding table is the `embed` module's; build the text model without a real one.
            self.language_model = Glm4vTextModel(hf_text_config)
            self.language_model.embed_tokens = None
            self.lm_head = nn.Linear(hf_text_config.hidden_size, vocab_size, bias=False)
            self.lm_head.weight.data.normal_(0.0, hf_text_config.initializer_range)
            self.last_logits_only = last_logits_only
            self.stage_layers = list(layers if layers is not None else range(len(self.language_model.layers)))
            self.final = final
            for i in range(len(self.language_model.layers)):
                if i not in self.stage_layers:
                    self.language_model.layers[i] = nn.Identity()
            if not final:
                self.language_model.norm = None
                self.lm_head = None

        @staticmethod
        def causal_mask(attention_mask: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
            """(B, 1, S, T) additive mask: query i (at position P + i) sees keys <= P + i that are not padding."""
            total = attention_mask.shape[1]
            key_pos = torch.arange(total, device=attention_mask.device)
            query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)
            allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
            zero = torch.zeros((), dtype=dtype)
            return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype))

        def forward(self, inputs_embeds, attention_mask=None, position_ids=None, *past):
            lm, layers = self.language_model, self.stage_layers
            if not layers:  # the head stage: the final norm and LM head alone (no mask, positions or cache)
                hidden = lm.norm(inputs_embeds)
                return self.lm_head(hidden[:, -1, :] if self.last_logits_only else hidden)
            cache = ExplicitCache({i: (past[2 * j], past[2 * j + 1]) for j, i in enumerate(layers)})
            mask = self.causal_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
            rotary = lm.rotary_emb(inputs_embeds, position_ids=position_ids.permute(1, 0, 2))
            hidden = inputs_embeds
            for i in layers:
                hidden = lm.layers[i](hidden, position_embeddings=rotary, attention_mask=mask, past_key_values=cache)
            presents = [t for i in layers for t in cache.present[i]]
            if not self.final:
                return (hidden, *presents)
            hidden = lm.norm(hidden)
            if self.last_logits_only:
                hidden = hidden[:, -1, :]
            return (self.lm_head(hidden), *presents)

    return TextDecoder


def _rotate_half_llm(x):
    """transformers' ``rotate_half_llm`` with ``reshape(x.shape)`` for ``flatten(-2)``.

    The TorchScript exporter mis-infers the rank after ``stack(...).flatten(-2)`` and then rejects a
    later ``cat``; the explicit reshape is the same permutation of the same values.
    """
    import torch

    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).reshape(x.shape)


def _recomposition_frequencies(self, freq):
    """``Glm4vTextRotaryEmbedding.recomposition_frequencies`` with positive axes.

    The TorchScript exporter resolves ``dim=-1`` of ``split`` against a wrong rank here and splits
    the batch axis; naming the axis explicitly exports the same computation.
    """
    import torch

    last = freq.dim() - 1
    parts = freq.split(self.mrope_section, dim=last)
    freq = torch.cat([m[i % 3] for i, m in enumerate(parts)], dim=last - 1)
    return freq.repeat_interleave(2, dim=last - 1)


@register("decoder", order=3)
class DecoderSpec(ModuleSpec):
    """GLM-4.1V text decoder + LM head with explicit KV cache: prefill and decode from one graph."""

    description = "GLM-4.1V text decoder + LM head, KV cache in/out"
    sections = ("text",)
    weight_prefixes = {
        "language_model.": ("model.language_model.", "model."),
        "lm_head.": ("lm_head.",),
    }
    checkpoint_ignore = ("embed_tokens.",)

    def build(self, cfg: BuildConfig):
        return self._build(cfg, None, True)

    def _build(self, cfg: BuildConfig, layers: Optional[range], final: bool):
        import torch

        from autoglm_build.modules.hf_configs import text_config

        # vocab_size=1: Glm4vTextModel's own embedding table is dropped (the `embed` module owns it).
        hf = text_config(cfg.text, vocab_size=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(cfg))
            module = _torch_module()(hf, cfg.text.vocab_size, cfg.export.logits == "last", layers, final)
        return module.eval()

    def parts(self, cfg: BuildConfig) -> List[str]:
        """``decoder``, or ``decoder.stage0`` .. with ``decoder.stages`` > 1 (:mod:`autoglm_build.parts`)."""
        count = cfg.decoder.parts
        return [self.name] if count == 1 else [part_name(self.name, k) for k in range(count)]

    def part(self, index: int) -> DecoderStageSpec:
        """The spec of stage ``index`` (``decoder.stage{index}``)."""
        return DecoderStageSpec(index)

    def export_patches(self) -> List[Patch]:
        from transformers.models.glm4v import modeling_glm4v

        return [
            Patch(modeling_glm4v, "rotate_half_llm", _rotate_half_llm),
            Patch(modeling_glm4v.Glm4vTextRotaryEmbedding, "recomposition_frequencies", _recomposition_frequencies),
        ]

    # ---- ONNX interface ---------------------------------------------------------------------

    def layers(self, cfg: BuildConfig) -> range:
        return range(cfg.text.num_hidden_layers)

    def input_names(self, cfg: BuildConfig) -> List[str]:
        names = ["inputs_embeds", "attention_mask", "position_ids"]
        for i in self.layers(cfg):
            names += [f"past_key.{i}", f"past_value.{i}"]
        return names

    def output_names(self, cfg: BuildConfig) -> List[str]:
        names = ["logits"]
        for i in self.layers(cfg):
            names += [f"present_key.{i}", f"present_value.{i}"]
        return names

    def fp16_io(self, cfg: BuildConfig) -> List[str]:
        """The KV cache crosses the graph boundary in FP16 (the graph computes in FP16 around it anyway):
        half the memory per cached token, half the bytes each decode step reads."""
        return [n for n in self.input_names(cfg) + self.output_names(cfg) if n.startswith(("past_", "present_"))]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        axes: Dict[str, Dict[int, str]] = {
            "inputs_embeds": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total_seq"},
            "position_ids": {0: "batch", 2: "seq"},
            "logits": {0: "batch"} if cfg.export.logits == "last" else {0: "batch", 1: "seq"},
        }
        for i in self.layers(cfg):
            axes[f"past_key.{i}"] = axes[f"past_value.{i}"] = {0: "batch", 2: "past_seq"}
            axes[f"present_key.{i}"] = axes[f"present_value.{i}"] = {0: "batch", 2: "total_seq"}
        return axes

    def kv_shape(self, cfg: BuildConfig, batch: int, length: int) -> Tuple[int, int, int, int]:
        t = cfg.text
        return (batch, t.num_key_value_heads, length, t.head_dim)

    def step_inputs(
        self, cfg: BuildConfig, rng: np.random.Generator, batch: int, seq: int, past: int, pad: int = 0
    ) -> Dict[str, np.ndarray]:
        """Inputs of one step with random embeddings and a zero cache of ``past`` positions.

        ``pad`` left-pads the first row by that many positions (masked out), as batched serving does.
        """
        total = past + seq
        mask = np.ones((batch, total), dtype=np.int64)
        mask[0, :pad] = 0
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]
        inputs = {
            "inputs_embeds": random_floats(rng, (batch, seq, cfg.text.hidden_size)),
            "attention_mask": mask,
            "position_ids": np.repeat(positions[:, None, :], 3, axis=1).astype(np.int64),
        }
        for i in self.layers(cfg):
            inputs[f"past_key.{i}"] = random_floats(rng, self.kv_shape(cfg, batch, past))
            inputs[f"past_value.{i}"] = random_floats(rng, self.kv_shape(cfg, batch, past))
        return inputs

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        return self.step_inputs(cfg, np.random.default_rng(0), batch=2, seq=3, past=4)

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        """Prefill of N tokens (first row left-padded by 2), then decode steps from the returned cache."""
        fed_back = {}
        for i in self.layers(cfg):
            fed_back[f"present_key.{i}"] = f"past_key.{i}"
            fed_back[f"present_value.{i}"] = f"past_value.{i}"
        for seq in cfg.export.decoder_seq_lens:
            for batch in cfg.export.batch_sizes:
                pad = min(2, seq - 1)
                steps = [self.step_inputs(cfg, rng, batch, seq, past=0, pad=pad)]
                for step in range(cfg.export.decoder_decode_steps):
                    past = seq + step
                    decode = self.step_inputs(cfg, rng, batch, 1, past=past, pad=pad)
                    steps.append({k: v for k, v in decode.items() if not k.startswith("past_")})
                yield Case(label=f"prefill {seq}+{cfg.export.decoder_decode_steps} decode",
                           batch=batch, steps=tuple(steps), chain=fed_back)

    #: greedy decode steps after each prefill, in calibration and in the accuracy report
    calibration_decode_steps = 3

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        """Prefill feeds of real prompts (embedded by the FP32 ``embed`` graph) and the decode feeds
        that follow them, the cache and next token coming from the FP32 decoder (teacher forcing)."""
        import onnxruntime as ort

        from autoglm_build.calibration import prompt_ids, split
        from autoglm_build.onnx_io import ort_options

        calib, held = split(prompt_ids(cfg, data), cfg.calibrate.holdout)
        embed = ort.InferenceSession(str(graphs["embed"]), ort_options(shared=True), providers=["CPUExecutionProvider"])
        decoder = decoder_run(cfg, graphs)

        def feeds(group, limit):
            out = []
            for batch in batched(group, cfg.calibrate.batch_size)[:limit]:
                out += self.greedy_feeds(cfg, batch, embed, decoder, self.calibration_decode_steps)
            return out

        return feeds(calib, cfg.calibrate.batches) + npz_feeds(self, cfg, data), feeds(held, len(held))

    def greedy_feeds(self, cfg: BuildConfig, batch, embed, decoder: Callable[[Feed], Feed],
                     steps: int) -> List[Dict[str, np.ndarray]]:
        """The decoder's inputs for a left-padded prefill of ``batch`` and ``steps`` greedy decode steps
        (``decoder``: the whole FP32 decoder, feed -> outputs, :func:`decoder_run`)."""
        from autoglm_build.calibration import left_pad

        ids, mask = left_pad(batch)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        layers = range(cfg.text.num_hidden_layers)
        feed = {f"past_{k}.{i}": np.zeros(self.kv_shape(cfg, len(batch), 0), np.float32)
                for i in layers for k in ("key", "value")}
        out = []
        for _ in range(steps + 1):
            feed.update(
                inputs_embeds=embed.run(None, {"input_ids": ids})[0],
                attention_mask=mask,
                position_ids=np.repeat(positions[:, None, :], 3, axis=1).astype(np.int64),
            )
            out.append(dict(feed))
            result = decoder(feed)
            ids = result["logits"].reshape(len(batch), -1, cfg.text.vocab_size)[:, -1].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones((len(batch), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            feed = {f"past_{k}.{i}": result[f"present_{k}.{i}"] for i in layers for k in ("key", "value")}
        return out


Feed = Dict[str, np.ndarray]


def decoder_run(cfg: BuildConfig, graphs) -> Callable[[Feed], Feed]:
    """The whole FP32 decoder in ONNX Runtime (CPU) as one call: its graph, or its stages' graphs
    chained (``graphs``: paths by module or part name)."""
    return chain([ort_part(graphs[name]) for name in DecoderSpec().parts(cfg)])


class DecoderStageSpec(StagePart, DecoderSpec):
    """Stage ``index`` of the decoder cut into ``decoder.stages`` contiguous layer ranges.

    Stage 0 takes ``inputs_embeds``, later stages the previous stage's ``hidden_states`` (B, S,
    hidden) as ``hidden_states_in``; the last stage adds the final norm and LM head and returns
    ``logits``, the others return ``hidden_states``. Each stage takes and returns its own layers'
    ``past_*``/``present_*`` under their global indices. Its weights are the whole decoder's (same
    seed, or the same checkpoint tensors), its validation cases the decoder's with the stage's inputs.

    With ``decoder.head_stage`` the layer stages all return ``hidden_states`` and one more stage (index
    ``decoder.stages``) holds no layer: ``hidden_states_in`` -> final norm -> LM head -> ``logits``, with
    no mask, positions or cache.
    """

    whole = DecoderSpec

    def last(self, cfg: BuildConfig) -> bool:
        return self.index == cfg.decoder.parts - 1

    def head(self, cfg: BuildConfig) -> bool:
        """The head stage (``decoder.head_stage``): the final norm and LM head, no layer."""
        return cfg.decoder.head_stage and self.index == cfg.decoder.stages

    def layers(self, cfg: BuildConfig) -> range:
        if self.index >= cfg.decoder.parts:
            raise ValueError(f"{self.name}: the config's decoder has {cfg.decoder.parts} parts "
                             f"(decoder.stages {cfg.decoder.stages}, head_stage {cfg.decoder.head_stage})")
        if self.head(cfg):
            n = cfg.text.num_hidden_layers
            return range(n, n)
        return layer_ranges(cfg.text.num_hidden_layers, cfg.decoder.stages)[self.index]

    def build(self, cfg: BuildConfig):
        # What the checkpoint holds beyond this stage's weights is the other stages': not "unused".
        others = [i for i in range(cfg.text.num_hidden_layers) if i not in self.layers(cfg)]
        self.checkpoint_ignore = DecoderSpec.checkpoint_ignore + tuple(f"layers.{i}." for i in others)
        if not self.last(cfg):
            self.checkpoint_ignore += ("norm.",)
            self.weight_prefixes = {k: v for k, v in DecoderSpec.weight_prefixes.items() if k != "lm_head."}
        return self._build(cfg, self.layers(cfg), self.last(cfg))

    def input_names(self, cfg: BuildConfig) -> List[str]:
        if self.head(cfg):
            return [HIDDEN_IN]
        names = super().input_names(cfg)
        return names if self.first() else [HIDDEN_IN] + names[1:]

    def output_names(self, cfg: BuildConfig) -> List[str]:
        names = super().output_names(cfg)
        return names if self.last(cfg) else [HIDDEN] + names[1:]

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        axes = super().dynamic_axes(cfg)
        if not self.first():
            axes[HIDDEN_IN] = axes.pop("inputs_embeds")
        if self.head(cfg):
            del axes["attention_mask"], axes["position_ids"]
        if not self.last(cfg):
            del axes["logits"]
            axes[HIDDEN] = {0: "batch", 1: "seq"}
        return axes

    def step_inputs(self, cfg: BuildConfig, rng: np.random.Generator, batch: int, seq: int, past: int,
                    pad: int = 0) -> Dict[str, np.ndarray]:
        inputs = super().step_inputs(cfg, rng, batch, seq, past, pad)
        if not self.first():
            inputs[HIDDEN_IN] = inputs.pop("inputs_embeds")
        names = self.input_names(cfg)
        return {n: v for n, v in inputs.items() if n in names or n.startswith("past_")}

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        data = super().fingerprint_data(cfg)
        data.update(module=self.name, stages=cfg.decoder.stages, layers=[self.layers(cfg).start, self.layers(cfg).stop])
        if cfg.decoder.head_stage and self.index >= cfg.decoder.stages - 1:  # the stages it changes
            data.update(head_stage=True)
        return data

