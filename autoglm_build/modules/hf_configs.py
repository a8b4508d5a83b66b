"""Our typed config sections as transformers configs (the math lives in transformers' classes).

Attention is pinned to transformers' ``eager`` implementation for export: it lowers to plain
MatMul/Softmax ONNX patterns that the optimize stage fuses and every TensorRT version parses,
where ``sdpa`` and flash kernels would lower differently per torch version.
"""

from __future__ import annotations

from typing import Any

from autoglm_build.config import AudioConfig, BuildConfig, TextConfig, VisionConfig

ATTN_IMPLEMENTATION = "eager"


def vision_config(v: VisionConfig) -> Any:
    """``Glm4vVisionConfig`` for the vision tower."""
    from transformers import Glm4vVisionConfig

    hf = Glm4vVisionConfig(
        depth=v.depth,
        hidden_size=v.hidden_size,
        num_heads=v.num_heads,
        intermediate_size=v.intermediate_size,
        out_hidden_size=v.out_hidden_size,
        patch_size=v.patch_size,
        image_size=v.image_size,
        spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size,
        in_channels=v.in_channels,
        rms_norm_eps=v.rms_norm_eps,
        hidden_act=v.hidden_act,
        attention_bias=v.attention_bias,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf


def text_config(t: TextConfig, vocab_size: int = 0) -> Any:
    """``Glm4vTextConfig`` for the decoder; ``vocab_size`` overrides the table size when non-zero."""
    from transformers import Glm4vTextConfig

    hf = Glm4vTextConfig(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=vocab_size or t.vocab_size,
        rms_norm_eps=t.rms_norm_eps,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "partial_rotary_factor": t.partial_rotary_factor,
            "mrope_section": list(t.mrope_section),
        },
    )
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf


def whisper_config(a: AudioConfig) -> Any:
    """``WhisperConfig`` whose encoder half is the speech encoder (the decoder half is never built)."""
    from transformers import WhisperConfig

    hf = WhisperConfig(
        num_mel_bins=a.num_mel_bins,
        d_model=a.d_model,
        encoder_layers=a.encoder_layers,
        encoder_attention_heads=a.encoder_attention_heads,
        encoder_ffn_dim=a.encoder_ffn_dim,
        max_source_positions=a.max_source_positions,
        activation_function=a.activation_function,
        decoder_layers=1,
        decoder_attention_heads=a.encoder_attention_heads,
    )
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf


def glm4v_config(cfg: BuildConfig) -> Any:
    """The whole ``Glm4vConfig`` (used to build transformers' reference model in tests)."""
    from transformers import Glm4vConfig

    hf = Glm4vConfig(
        vision_config=vision_config(cfg.vision).to_dict(),
        text_config=text_config(cfg.text).to_dict(),
    )
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf
