"""The module registry (optimum's ``TasksManager`` in miniature).

``@register("vision")`` on a :class:`~autoglm_build.modules.base.ModuleSpec` subclass makes it known
by that name; :func:`get` returns an instance or raises a one-line error listing the valid names.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Type, TypeVar

from autoglm_build.errors import UserError

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
    """The spec registered as ``name``.

    Raises:
        UserError: for an unknown name, listing the valid ones.
    """
    _ensure_loaded()
    try:
        cls: Type = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown module '{name}'; valid: {', '.join(names())}") from None
    return cls()


def _ensure_loaded() -> None:
    import autoglm_build.modules  # noqa: F401  (registers the built-in modules)
