"""Graph rewrites: one class per file (onnxruntime's fusion classes), applied in this order."""

from autoglm_build.rewrites.attention import FuseAttention
from autoglm_build.rewrites.attention_scale import ScaleQueryFirst
from autoglm_build.rewrites.base import Rewrite
from autoglm_build.rewrites.cleanup import Cleanup
from autoglm_build.rewrites.gelu import FuseGelu
from autoglm_build.rewrites.layernorm import DecomposeLayerNorm
from autoglm_build.rewrites.qdq import QDQOnlyOnQuantizedOps
from autoglm_build.rewrites.rmsnorm import FuseRMSNorm

REWRITES = {cls.name: cls for cls in (Cleanup, FuseGelu, FuseRMSNorm, FuseAttention, ScaleQueryFirst)}

__all__ = ["REWRITES", "Cleanup", "DecomposeLayerNorm", "FuseAttention", "FuseGelu", "FuseRMSNorm",
           "QDQOnlyOnQuantizedOps", "Rewrite", "ScaleQueryFirst"]
