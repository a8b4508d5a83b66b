"""A staged module: one module cut into contiguous layer ranges ("parts"), each its own graph.

``decoder.stages: N`` builds ``decoder.stage0`` .. ``decoder.stage{N-1}`` (``vision.stages: N`` likewise
``vision.stage0`` ..., ending in ``image_embeds``): each part is exported,
optimized, calibrated and built into an engine on its own (its own manifest records, so the engine
builds can run in parallel processes), while ``verify``, ``bench`` and ``serve`` run the module as
one by chaining its parts (:func:`chain`): the first part takes the module's inputs, each later part
takes :data:`HIDDEN` from the part before it (as :data:`HIDDEN_IN`), and every part reads only the
inputs it declares (its own layers' ``past_*``). The outputs are the union of the parts' outputs without the activations
that crossed between them, the last part's main output (``logits``) first, as the unstaged graph
has it. Cache names keep their global layer index (``past_key.{i}``), so a KV cache over the
module's names serves the staged module unchanged.

Imports on the GPU harness's Python 3.9 without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Feed = Dict[str, np.ndarray]
#: a run over a list of step feeds (verify's), one output dict per step
StepsRun = Callable[[List[Feed]], List[Dict[str, np.ndarray]]]
#: one part for :func:`chain`: its input names, and feed -> outputs
Part = Tuple[Sequence[str], Callable[[Feed], Dict[str, np.ndarray]]]
#: the activations a part hands to the next one (its output), and the name the next part takes them under:
#: a middle part takes them in and gives them out, and one graph cannot name an input and an output alike
HIDDEN = "hidden_states"
HIDDEN_IN = "hidden_states_in"
SEPARATOR = ".stage"


def part_name(module: str, index: int) -> str:
    """``decoder.stage1`` for part 1 of ``decoder``."""
    return f"{module}{SEPARATOR}{index}"


def split_name(name: str) -> Tuple[str, Optional[int]]:
    """(module, part index) of ``decoder.stage1``; (name, None) for a name that is no part's."""
    module, sep, index = name.rpartition(SEPARATOR)
    if sep and module and index.isdigit():
        return module, int(index)
    return name, None


def module_parts(config: Optional[Dict], module: str) -> List[str]:
    """The build units of ``module`` in a build whose manifest records ``config`` (its JSON data): the
    module, or its parts where the module's config section (``decoder:``) sets ``stages`` > 1 or
    ``head_stage`` (one more part after the layer stages)."""
    section = (config or {}).get(module)
    section = section if isinstance(section, dict) else {}
    count = section.get("stages", 1) + int(bool(section.get("head_stage", False)))
    return [module] if count == 1 else [part_name(module, k) for k in range(count)]


def layer_ranges(layers: int, stages: int) -> List[range]:
    """``layers`` cut into ``stages`` contiguous ranges, as even as possible (earlier ones take the
    remainder): 40 layers in 3 stages are 0-13, 14-26, 27-39."""
    size, extra = divmod(layers, stages)
    out, start = [], 0
    for k in range(stages):
        stop = start + size + (1 if k < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def part_feed(inputs: Sequence[str], carried: Feed) -> Feed:
    """A part's own inputs out of ``carried`` (the module's feed with the earlier parts' outputs added):
    :data:`HIDDEN_IN` is the part before's :data:`HIDDEN`."""
    source = {n: HIDDEN if n == HIDDEN_IN else n for n in inputs}
    return {n: carried[source[n]] for n in inputs if source[n] in carried}


def chain_steps(parts: Sequence[Tuple[Sequence[str], StepsRun]]) -> StepsRun:
    """One run over the parts in order: ``(input names, run)`` per part.

    Each step's feed is offered to every part, restricted to the part's own inputs, with the earlier
    parts' outputs of the same step added (``hidden_states``, the one that crosses).
    """

    def run(steps: List[Feed]) -> List[Dict[str, np.ndarray]]:
        carried = [dict(step) for step in steps]
        merged: List[Dict[str, np.ndarray]] = [{} for _ in steps]
        for inputs, part_run in parts:
            outs = part_run([part_feed(inputs, c) for c in carried])
            for c, m, out in zip(carried, merged, outs):
                c.update(out)
                m.update(out)
        return [_module_outputs(m) for m in merged]

    return run


def chain(parts: Sequence[Tuple[Sequence[str], Callable[[Feed], Dict[str, np.ndarray]]]]
          ) -> Callable[[Feed], Dict[str, np.ndarray]]:
    """:func:`chain_steps` for one feed: ``(input names, run(feed) -> outputs)`` per part."""
    steps = chain_steps([(inputs, _per_step(run)) for inputs, run in parts])
    return lambda feed: steps([feed])[0]


def ort_part(path: Any, session: Any = None) -> Part:
    """One graph in ONNX Runtime on the CPU as a :data:`Part` (float inputs cast to the graph's types:
    a precision graph takes its KV cache in FP16)."""
    from autoglm_build.onnx_io import feed_for, ort_options

    if session is None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), ort_options(shared=True), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feed: Feed) -> Dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feed_for(session, feed))))

    return [i.name for i in session.get_inputs()], run


@dataclass
class Around:
    """How one stage's precision graph is measured: as its module. The module's held-out ``feeds`` run
    through the stages before it (``before_ref`` FP32 for the reference, ``before_got`` the precision
    graphs already made for the candidate), the stage, and the FP32 stages after it (``after``); the
    module's ``output`` (``logits``) of the two chains is compared. A stage's sensitivity fallback then
    answers to the module's gate, given the stages before it as they were quantized."""

    feeds: List[Feed]
    before_ref: List[Part]
    before_got: List[Part]
    after: List[Part]
    output: str

    def runs(self, ref: Part, got: Part) -> Tuple[Callable[[Feed], Feed], Callable[[Feed], Feed]]:
        """(reference, candidate): the module run with the stage's FP32 graph, and with ``got``."""
        return chain([*self.before_ref, ref, *self.after]), chain([*self.before_got, got, *self.after])


def _per_step(run: Callable[[Feed], Dict[str, np.ndarray]]) -> StepsRun:
    return lambda steps: [run(step) for step in steps]


def _module_outputs(merged: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The module's outputs: without the activations that crossed between parts, and the main output
    (``logits``, the last part's) first, as the unstaged graph orders them."""
    main = {k: v for k, v in merged.items() if not k.startswith("present_") and k != HIDDEN}
    if not main:  # a chain that ends inside the module: the activations are its result
        main = {HIDDEN: merged[HIDDEN]} if HIDDEN in merged else {}
    return {**main, **{k: v for k, v in merged.items() if k.startswith("present_")}}
