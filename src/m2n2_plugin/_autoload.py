"""Register the mergekit method ``m2n2`` the moment mergekit's method registry is imported.

mergekit 0.1.5 has no plugin discovery: ``mergekit-yaml`` only knows the methods that are
registered when it looks one up. Importing mergekit (and torch) from a ``.pth`` file would make
every Python start-up seconds slower, so the ``.pth`` file shipped with this distribution only
imports this package, whose ``__init__`` calls :func:`install`. That puts a one-shot finder on
``sys.meta_path``; when something imports ``mergekit.merge_methods``, the finder lets the normal
machinery load it and, once the module has executed, imports :mod:`m2n2_plugin.merge.method` and
registers the method. The same finder waits for ``mergekit.card`` (the model card step) and
lets it take an existing local model folder for local (:mod:`m2n2_plugin.merge.offline_card`),
so that ``mergekit-yaml`` on ``models/a`` works offline. Once both have been seen the finder is
gone.

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
#: mergekit's model card module, mended for offline local folders when it is imported.
CARD = "mergekit.card"


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


def _mend_card() -> None:
    """Let mergekit's card step take an existing model folder for local (never fails)."""
    try:
        from m2n2_plugin.merge.offline_card import local_folders_are_local

        local_folders_are_local(sys.modules[CARD])
    except Exception as exc:  # noqa: BLE001 - mergekit must keep working without us
        import warnings

        warnings.warn(
            f"m2n2_plugin: could not mend mergekit's model card for local folders: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )


#: What to do once each watched module has executed.
HOOKS = {TARGET: _register_now, CARD: _mend_card}


class _RunAfterExec:
    """Loader proxy: run the real loader, then ``after``; everything else is delegated."""

    def __init__(self, loader: Any, after: Any) -> None:
        self._loader = loader
        self._after = after

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # Put the real loader back first, so the module looks exactly as if we never were here.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class RegistrationFinder:
    """A ``sys.meta_path`` finder that only reacts to the modules in :data:`HOOKS`, once each."""

    #: Marks our finder even across reloads of this module (see :func:`install`).
    m2n2_autoload = True

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in HOOKS:
            return None
        if all(name in sys.modules for name in HOOKS if name != fullname):
            _remove_finders()  # the last one: nothing left to watch
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None or getattr(finder, "m2n2_autoload", False):
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterExec(spec.loader, HOOKS[fullname])
        return spec


def _remove_finders() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "m2n2_autoload", False)]


def install() -> None:
    """Arrange for ``m2n2`` to be registered with mergekit; idempotent and cheap.

    A watched module already imported gets its hook right away (registering imports torch and
    mergekit, which are loaded anyway). For the others, add the finder, unless one is there.
    """
    for name, hook in HOOKS.items():
        if name in sys.modules:
            hook()
    if all(name in sys.modules for name in HOOKS):
        return
    if not any(getattr(f, "m2n2_autoload", False) for f in sys.meta_path):
        sys.meta_path.insert(0, RegistrationFinder)
