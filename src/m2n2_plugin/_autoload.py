"""Register the mergekit method ``m2n2`` the moment mergekit's method registry is imported.

mergekit 0.1.5 has no plugin discovery: ``mergekit-yaml`` only knows the methods that are
registered when it looks one up. Importing mergekit (and torch) from a ``.pth`` file would make
every Python start-up seconds slower, so the ``.pth`` file shipped with this distribution only
imports this package, whose ``__init__`` calls :func:`install`. That puts a one-shot finder on
``sys.meta_path``; when something imports ``mergekit.merge_methods``, the finder lets the normal
machinery load it and, once the module has executed, imports :mod:`m2n2_plugin.merge.method` and
registers the method. After that the finder is gone.

This module must stay standard-library only and cheap to import: it runs in every interpreter
of the environment. Set ``M2N2_NO_AUTOLOAD=1`` to skip it at start-up (``import m2n2_plugin``
still registers the method).
"""

from __future__ import annotations

import sys

# typing is not imported at run time: this module is on every interpreter's start-up path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The module whose import triggers registration (it holds mergekit's registry).
TARGET = "mergekit.merge_methods"


def _register_now() -> None:
    """Register the method; never let a failure here break the import of mergekit."""
    module = sys.modules.get("m2n2_plugin.merge.method")
    if module is not None and not hasattr(module, "register"):
        # merge_method is being imported and is what imports mergekit: it registers itself
        # at the end of its import.
        return
    try:
        from m2n2_plugin.merge.method import register

        register()
    except Exception as exc:  # noqa: BLE001 - mergekit must keep working without us
        import warnings

        warnings.warn(
            f"m2n2_plugin: could not register the mergekit merge method 'm2n2': {exc}",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterExec:
    """Loader proxy: run the real loader, then register; everything else is delegated."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Put the real loader back first, so the module looks exactly as if we never were here.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register_now()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class RegistrationFinder:
    """A ``sys.meta_path`` finder that only reacts to :data:`TARGET`, once."""

    #: Marks our finder even across reloads of this module (see :func:`install`).
    m2n2_autoload = True

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        _remove_finders()
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _remove_finders() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "m2n2_autoload", False)]


def install() -> None:
    """Arrange for ``m2n2`` to be registered with mergekit; idempotent and cheap.

    If mergekit's registry is already imported, register right away (this imports torch and
    mergekit, which are loaded anyway). Otherwise add the finder, unless one is there already.
    """
    if TARGET in sys.modules:
        _register_now()
        return
    if not any(getattr(f, "m2n2_autoload", False) for f in sys.meta_path):
        sys.meta_path.insert(0, RegistrationFinder)
