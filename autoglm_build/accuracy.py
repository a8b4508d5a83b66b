"""Is a precision graph accurate enough? Its main output against the FP32 graph's, and the gate.

One measure for ``calibrate``'s report and ``verify``'s ONNX Runtime check (numpy only: it imports
on the GPU harness's Python 3.9 without torch):

- cosine per sample (each row of the module's main output: a decoder row's logits, an image token's
  embedding), reported as min and mean;
- max abs and max abs over max |ref|;
- for ``logits``, greedy next-token agreement: the share of positions whose argmax equals FP32's.

The gate (``calibrate.gate``) holds the mean cosine (a single near-zero image token can point
elsewhere at INT8 while the image's embedding is right; a broken graph lowers them all) and, for
the decoder, the greedy agreement.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np


class Agreement:
    """Accumulates a candidate's main output against the reference's, feed by feed.

    Args:
        output: The output's name (``logits`` adds greedy agreement).
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.cosines: List[float] = []
        self.max_abs = 0.0
        self.scale = 0.0
        self.agree = 0
        self.total = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        """One feed's outputs (same shape; rows along axis 0)."""
        a, b = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if a.size == 0:
            return
        for row_a, row_b in zip(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)):
            self.cosines.append(cosine(row_a, row_b))
        self.max_abs = max(self.max_abs, float(np.abs(a - b).max()))
        self.scale = max(self.scale, float(np.abs(a).max()))
        if self.output == "logits":
            tokens_a = a.reshape(-1, a.shape[-1]).argmax(-1)
            tokens_b = b.reshape(-1, b.shape[-1]).argmax(-1)
            self.agree += int((tokens_a == tokens_b).sum())
            self.total += int(tokens_a.size)

    def result(self) -> Dict[str, Any]:
        """``output``, ``samples``, ``cosine_min``, ``cosine_mean``, ``max_abs``, ``max_rel`` and, for
        logits, ``greedy_agreement`` and ``greedy_positions``."""
        out: Dict[str, Any] = {
            "output": self.output, "samples": len(self.cosines),
            "cosine_min": min(self.cosines) if self.cosines else 1.0,
            "cosine_mean": float(np.mean(self.cosines)) if self.cosines else 1.0,
            "max_abs": self.max_abs, "max_rel": self.max_abs / self.scale if self.scale else 0.0,
        }
        if self.total:
            out["greedy_agreement"] = self.agree / self.total
            out["greedy_positions"] = self.total
        return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom else float(np.array_equal(a, b))


def gate_of(cfg: Any) -> Any:
    """The build's ``calibrate.gate``; greedy agreement is gated only with a checkpoint: on seeded
    random weights the logits are nearly flat and their argmax a coin toss between near-equal
    values (it is still reported)."""
    gate = cfg.calibrate.gate
    return gate if cfg.checkpoint else gate.model_copy(update={"greedy_agreement": 0.0})


def gate_failures(result: Dict[str, Any], gate: Any) -> List[str]:
    """What in an :meth:`Agreement.result` misses ``gate`` (``calibrate.gate``), one phrase each;
    empty when it passes."""
    failures = []
    if result["cosine_mean"] < gate.cosine:
        failures.append(f"mean cosine vs FP32 {result['cosine_mean']:.6f} < {gate.cosine}")
    agreement = result.get("greedy_agreement")
    if agreement is not None and agreement < gate.greedy_agreement:
        failures.append(f"greedy agreement {agreement:.1%} ({round(agreement * result['greedy_positions'])}/"
                        f"{result['greedy_positions']}) < {gate.greedy_agreement:.0%}")
    return failures
