"""The select graph (runtime/select.py), run by ONNX Runtime: greedy rows pick what the host sampler picks, sampled
rows draw from their top-k nucleus at its probabilities, rows are independent, and the graph keeps to what
TensorRT 8.5 builds as single layers."""

from __future__ import annotations

import numpy as np
import pytest

from autoglm_build.runtime.select import MAX_K, OPS, gumbel, select_graph


def _session(k: int):
    import onnxruntime as ort

    return ort.InferenceSession(select_graph(k).SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(logits, bias=None, counts=None, frequency=0.0, presence=0.0, temperature=0.0, top_p=1.0, noise=None, k=8):
    rows, vocab = logits.shape
    column = lambda v: np.full((rows, 1), v, np.float32) if np.isscalar(v) else np.asarray(v, np.float32)[:, None]  # noqa: E731
    return {"logits": logits.astype(np.float32),
            "bias": np.zeros((rows, vocab), np.float32) if bias is None else bias.astype(np.float32),
            "counts": np.zeros((rows, vocab), np.float32) if counts is None else counts.astype(np.float32),
            "penalties": np.concatenate([column(frequency), column(presence)], axis=1),
            "temperature": column(temperature), "top_p": column(top_p),
            "noise": np.zeros((rows, k), np.float32) if noise is None else noise}


def test_greedy_rows_take_the_largest_penalized_allowed_logit():
    rng = np.random.default_rng(0)
    rows, vocab = 16, 300
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bias = np.where(rng.random((rows, vocab)) < 0.2, -np.inf, 0.0)  # ids some rows may not produce
    counts = rng.integers(0, 3, (rows, vocab)).astype(np.float32) * (rng.random((rows, vocab)) < 0.1)
    frequency, presence = rng.random(rows) * 0.5, rng.random(rows) * 0.5
    got = _session(8).run(None, _feed(logits, bias, counts, frequency, presence, temperature=0.0))[0][:, 0]
    want = np.argmax(logits + bias - counts * frequency[:, None] - (counts > 0) * presence[:, None], axis=1)
    np.testing.assert_array_equal(got, want)


def test_sampled_rows_draw_from_the_top_p_nucleus_at_its_probabilities():
    """20,000 rows of the same logits, each with its own noise: the ids drawn are the nucleus's, at the nucleus's
    renormalized softmax probabilities at the row's temperature (within 1.5 points each)."""
    k, rows, temperature, top_p = 16, 20_000, 0.7, 0.8
    logits = np.tile(np.linspace(2.0, -2.0, 40, dtype=np.float32), (rows, 1))
    noise = gumbel(np.random.default_rng(1), rows, k)
    got = _session(k).run(None, _feed(logits, temperature=temperature, top_p=top_p, noise=noise, k=k))[0][:, 0]
    top = np.exp(logits[0, :k] / temperature)
    probs = top / top.sum()
    keep = (np.cumsum(probs) - probs) < top_p
    want = np.where(keep, probs, 0.0) / probs[keep].sum()
    seen = np.bincount(got, minlength=40)[:k] / rows
    assert set(np.flatnonzero(seen)) <= set(np.flatnonzero(keep))
    np.testing.assert_allclose(seen, want, atol=0.015)


def test_rows_are_independent_and_seeded_noise_repeats_its_tokens():
    rng = np.random.default_rng(2)
    k, rows = 8, 6
    logits = rng.standard_normal((rows, 50)).astype(np.float32)
    temperature = np.array([0.0, 0.7, 1.0, 0.0, 1.3, 0.5], np.float32)
    noise = np.concatenate([gumbel(np.random.default_rng(seed), 1, k) for seed in range(rows)])
    session = _session(k)
    batch = session.run(None, _feed(logits, temperature=temperature, noise=noise, k=k))[0][:, 0]
    alone = [session.run(None, _feed(logits[r:r + 1], temperature=temperature[r:r + 1], noise=noise[r:r + 1], k=k))
             [0][0, 0] for r in range(rows)]
    np.testing.assert_array_equal(batch, alone)
    again = np.concatenate([gumbel(np.random.default_rng(seed), 1, k) for seed in range(rows)])
    np.testing.assert_array_equal(noise, again)


def test_the_graph_keeps_to_single_layer_ops_and_tensorrts_topk_limit():
    model = select_graph(MAX_K)
    assert {n.op_type for n in model.graph.node} <= OPS
    assert not {"CumSum", "RandomUniform", "RandomUniformLike", "Loop"} & {n.op_type for n in model.graph.node}
    with pytest.raises(ValueError, match="k 3841 is outside 1..3840"):
        select_graph(MAX_K + 1)
