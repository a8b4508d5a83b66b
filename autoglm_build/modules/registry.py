"""The module registry (optimum's ``TasksManager`` in miniature).

``@register("vision")`` on a :class:`~autoglm_build.modules.base.ModuleSpec` subclass makes it known
by that name; :func:`get` returns an instance or raises a one-line error listing the valid names.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Type, TypeVar

from autoglm_build.errors import UserError
from autoglm_build.parts import split_name

_REGISTRY: Dict[str, type] = {}
_ORDER: Dict[str, int] = {}
_T = TypeVar("_T", bound=type)


def register(name: str, order: int) -> Callable[[_T], _T]:
    """Class decorator: register a module spec under ``name``.

    Args:
        name: The module's name in configs, the CLI and the manifest.
        order: Its place in listings and in the pipeline (encoders first, the decoder last).
    """

    def wrap(cls: _T) -> _T:
        if name in _REGISTRY:
            raise ValueError(f"module '{name}' is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        _ORDER[name] = order
        return cls

    return wrap


def names() -> List[str]:
    """Registered module names, in pipeline order (vision, audio, embed, decoder)."""
    _ensure_loaded()
    return sorted(_REGISTRY, key=_ORDER.__getitem__)


def get(name: str):  # -> ModuleSpec (not annotated: avoids an import cycle)
    """The spec registered as ``name``, or for a part's name (``decoder.stage1``, see
    :mod:`autoglm_build.parts`) its module's spec for that part.

    Raises:
        UserError: for an unknown name, listing the valid ones.
    """
    _ensure_loaded()
    module, index = split_name(name)
    try:
        cls: Type = _REGISTRY[module]
    except KeyError:
        raise UserError(f"unknown module '{name}'; valid: {', '.join(names())}") from None
    if index is None:
        return cls()
    if not hasattr(cls, "part"):
        raise UserError(f"unknown module '{name}': '{module}' is not built in stages; valid: {', '.join(names())}")
    return cls().part(index)


def expand(cfg, modules: Sequence[str], parts: bool = True) -> List[str]:
    """Build units for ``modules``: each staged module's parts (``parts``), or each part's module
    (not ``parts``: the stages that take a staged module as one), in order, without repeats.

    Raises:
        UserError: a part the config does not build (``decoder.stage3`` with ``decoder.stages: 2``).
    """
    out: List[str] = []
    for name in modules:
        spec = get(name)
        module_parts = get(spec.module).parts(cfg)
        if spec.name != spec.module and spec.name not in module_parts:
            raise UserError(f"unknown module '{name}'; this config builds {', '.join(module_parts)}")
        if not parts:
            units = [spec.module]
        else:
            units = [spec.name] if spec.name != spec.module else module_parts
        out += [u for u in units if u not in out]
    return out


def _ensure_loaded() -> None:
    import autoglm_build.modules  # noqa: F401  (registers the built-in modules)
