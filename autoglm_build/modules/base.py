"""What every modality module declares (optimum's per-architecture ``OnnxConfig``).

A :class:`ModuleSpec` says how to build the torch module that is exported, which checkpoint keys
feed it, its ONNX inputs/outputs and dynamic axes, its example inputs, and how its export is
validated. Specs are torch-free at import: torch and transformers are imported inside the methods
that need them, so the registry can be read on the engine path (Python 3.9, no torch).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from autoglm_build.config import BuildConfig, Tolerance

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Case:
    """One validation run: a label for the table and the ONNX inputs of each step.

    Single-shot modules have one step. The decoder has a prefill step followed by decode steps whose
    cache inputs come from the previous step's outputs (``chain``), separately for each backend.
    """

    label: str
    batch: int
    steps: Tuple[Dict[str, np.ndarray], ...]
    chain: Optional[Mapping[str, str]] = None  # output name -> input name fed to the next step


class StagePart:
    """One stage of a module cut into contiguous ranges (``<module>.stage{index}``), mixed in before the
    module's spec (``class DecoderStageSpec(StagePart, DecoderSpec)``): its name, its module and the
    module's parts; ``whole`` is the module's spec class, ``unit`` what the ranges count."""

    whole: type
    unit = "layers"

    def __init__(self, index: int) -> None:
        from autoglm_build.parts import part_name

        self.index = index
        self.name = part_name(self.whole.name, index)
        self.description = f"{self.whole.name} stage {index}: a contiguous range of its {self.unit}"

    @property
    def module(self) -> str:
        return self.whole.name

    def parts(self, cfg: BuildConfig) -> List[str]:
        return self.whole().parts(cfg)

    def first(self) -> bool:
        return self.index == 0

    def calibration_batches(self, cfg: BuildConfig, data, graphs):
        """The module's calibration and held-out feeds (its stages chained in FP32), each turned into this
        stage's feed: the earlier stages' FP32 ``hidden_states`` and this stage's own inputs (a decoder
        stage's own cache). The module's own held-out feeds are kept for :meth:`accuracy_around`."""
        from autoglm_build.parts import HIDDEN, HIDDEN_IN, chain, ort_part

        calib, held = super().calibration_batches(cfg, data, graphs)
        self.module_heldout = held
        earlier = self.whole().parts(cfg)[:self.index]
        run = chain([ort_part(graphs[name]) for name in earlier]) if earlier else None
        inputs = self.input_names(cfg)

        def own(feed):
            full = dict(feed)
            if run is not None:
                full[HIDDEN_IN] = run(feed)[HIDDEN]
            return {n: full[n] for n in inputs}

        return [own(f) for f in calib], [own(f) for f in held]

    def accuracy_around(self, cfg: BuildConfig, graphs, earlier):
        """This stage measured as its module (after :meth:`calibration_batches`): the module's main output on
        its held-out feeds, through ``earlier`` (the precision graphs of the stages before this one, by name)
        and the FP32 stages after it (``graphs``)."""
        from autoglm_build.parts import Around, ort_part

        names = self.whole().parts(cfg)
        return Around(feeds=self.module_heldout,
                      before_ref=[ort_part(graphs[n]) for n in names[:self.index]],
                      before_got=[ort_part(earlier[n]) for n in names[:self.index]],
                      after=[ort_part(graphs[n]) for n in names[self.index + 1:]],
                      output=self.whole().output_names(cfg)[0])


class ModuleSpec:
    """Base class of a registered modality module.

    Subclasses set ``name``, ``sections`` (the config sections that determine the module, hashed
    into its fingerprint) and ``weight_prefixes`` (module state-dict prefix -> candidate checkpoint
    prefixes, first match wins), and implement the abstract methods.
    """

    name: str = ""
    description: str = ""
    sections: Tuple[str, ...] = ()
    weight_prefixes: Mapping[str, Tuple[str, ...]] = {}
    #: checkpoint keys under the chosen prefixes that belong to another module (not "unused")
    checkpoint_ignore: Tuple[str, ...] = ()
    #: the name of axis 0 of every input: ``batch`` (rows), or ``patches`` for the packed vision tower
    batch_axis: str = "batch"

    @property
    def module(self) -> str:
        """The registered module this spec builds (a part's module: ``decoder`` for ``decoder.stage1``);
        config entries by module name (tolerances, calibration policy) are looked up under it."""
        return self.name

    def parts(self, cfg: BuildConfig) -> List[str]:
        """The build units of this module: ``[name]``, or its parts when the config stages it."""
        return [self.name]

    # ---- building ---------------------------------------------------------------------------

    def build(self, cfg: BuildConfig) -> torch.nn.Module:
        """The export-ready torch module with seeded random weights (fp32, eval mode)."""
        raise NotImplementedError

    def seed(self, cfg: BuildConfig) -> int:
        """Per-module seed: changing one module's config leaves the others' weights as they were."""
        return (cfg.seed * 1_000_003 + zlib.crc32(self.module.encode())) % (2**63)

    # ---- ONNX interface ---------------------------------------------------------------------

    def input_names(self, cfg: BuildConfig) -> List[str]:
        raise NotImplementedError

    def output_names(self, cfg: BuildConfig) -> List[str]:
        raise NotImplementedError

    def dynamic_axes(self, cfg: BuildConfig) -> Dict[str, Dict[int, str]]:
        """Named dynamic axes of every input and output (``batch`` is always axis 0)."""
        raise NotImplementedError

    def fp16_io(self, cfg: BuildConfig) -> List[str]:
        """Inputs and outputs that are FP16 in the module's FP16 and INT8 graphs (all other I/O stays
        FP32, as the FP32 graph has it)."""
        return []

    def export_patches(self) -> List[Patch]:
        """Attributes replaced while exporting (optimum's ``ModelPatcher``); each must compute the same."""
        return []

    def export_inputs(self, cfg: BuildConfig) -> Dict[str, np.ndarray]:
        """Inputs the graph is traced with: batch 2 and non-trivial lengths, so no axis specialises."""
        raise NotImplementedError

    # ---- validation -------------------------------------------------------------------------

    def cases(self, cfg: BuildConfig, rng: np.random.Generator) -> Iterator[Case]:
        """The validation runs: batch sizes from the config crossed with the module's lengths."""
        raise NotImplementedError

    def calibration_batches(
        self, cfg: BuildConfig, data: Any, graphs: Mapping[str, Any]
    ) -> Tuple[List[Dict[str, np.ndarray]], List[Dict[str, np.ndarray]]]:
        """(calibration feeds, held-out feeds) from real data (``autoglm_build.calibration``).

        Args:
            cfg: The build config.
            data: A :class:`~autoglm_build.calibration.CalibrationData`.
            graphs: FP32 ONNX paths by module name (the decoder embeds its prompts with ``embed``).
        """
        raise NotImplementedError

    def accuracy_around(self, cfg: BuildConfig, graphs: Mapping[str, Any], earlier: Mapping[str, Any]) -> Any:
        """How calibrate measures a precision graph of this spec: None (its first output against the FP32
        graph's on the held-out feeds), or for one stage of a staged module an
        :class:`~autoglm_build.parts.Around` (the module's output, the stage run inside the module).

        Args:
            graphs: FP32 graphs by name (``calibrate``'s upstream); earlier: the precision graphs of
                the stages before this one, by name.
        """
        return None

    def verification_feeds(self, cfg: BuildConfig, data: Any) -> List[Dict[str, np.ndarray]]:
        """The ``samples`` stage's steps when the module chooses them itself (one feed each; ``take_rows``
        makes each batch size's rows): none by default, and the stage takes held-out calibration feeds."""
        return []

    def take_rows(self, cfg: BuildConfig, feed: Dict[str, np.ndarray], batch: int) -> Dict[str, np.ndarray]:
        """A feed of ``batch`` items made from ``feed``'s (repeating rows when it has fewer)."""
        return {name: _repeat_rows(value, batch) for name, value in feed.items()}

    def feed_items(self, feed: Dict[str, np.ndarray]) -> int:
        """Items (batch rows; images for the vision tower) in a feed."""
        return int(next(iter(feed.values())).shape[0])

    def tolerance(self, cfg: BuildConfig) -> Tolerance:
        return cfg.export.tolerances.get(self.module, Tolerance())

    def fingerprint_data(self, cfg: BuildConfig) -> Dict[str, Any]:
        """What determines this module's export: its sections, the seed and the export settings."""
        export = cfg.section("export")
        export["tolerances"] = export["tolerances"].get(self.module)
        from autoglm_build.stages.base import source_hash

        return {
            "module": self.name,
            "code": source_hash(type(self)),
            "sections": {s: cfg.section(s) for s in self.sections},
            "seed": cfg.seed,
            "export": export,
        }


@dataclass(frozen=True)
class Patch:
    """Replace ``owner.attr`` by ``value`` for the duration of an export."""

    owner: Any
    attr: str
    value: Any


def _repeat_rows(value: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // value.shape[0])
    return np.concatenate([value] * reps, axis=0)[:batch]


def batched(items: List[Any], size: int) -> List[List[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def npz_feeds(spec: ModuleSpec, cfg: BuildConfig, data: Any) -> List[Dict[str, np.ndarray]]:
    """Preprocessed extra batches from ``<data>/<module>/*.npz``, with the module's inputs. A stage of a staged
    module reads its module's (``<data>/vision/``, with ``pixel_values``...): the stage calibrates on the
    module's batches carried through the stages before it (:meth:`StagePart.calibration_batches`)."""
    from autoglm_build.calibration import load_npz

    whole = spec.whole() if isinstance(spec, StagePart) else spec
    return [load_npz(p, whole.input_names(cfg)) for p in data.npz.get(whole.name, [])]


def random_floats(rng: np.random.Generator, shape: Sequence[int], scale: float = 1.0) -> np.ndarray:
    """Standard-normal float32 inputs (the distribution the validation feeds every float input)."""
    return (rng.standard_normal(size=tuple(shape)) * scale).astype(np.float32)
