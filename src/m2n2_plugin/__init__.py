"""M2N2 (Model Merging of Natural Niches) for mergekit and Optuna.

Importing this package is cheap on purpose: the ``.pth`` file this distribution installs imports
it in every interpreter of the environment, so that ``mergekit-yaml`` knows ``merge_method: m2n2``
without anyone importing anything. Keep this module free of eager imports of torch, mergekit or
anything heavy; the kernel helpers below are loaded on first use.

``import m2n2_plugin`` registers the mergekit method: at once if ``mergekit.merge_methods`` is
already imported, otherwise the moment it is (see :mod:`m2n2_plugin._autoload`).
:func:`register` does it eagerly.
"""

from __future__ import annotations

from m2n2_plugin import _autoload

TYPE_CHECKING = False
if TYPE_CHECKING:
    from mergekit.merge_methods import MergeMethod

    from m2n2_plugin.merge.kernel import global_cosine
    from m2n2_plugin.merge.kernel import split_index
    from m2n2_plugin.merge.kernel import split_slerp

__all__ = ["global_cosine", "register", "split_index", "split_slerp"]
__version__ = "0.1.0"

_KERNEL_EXPORTS = frozenset({"global_cosine", "split_index", "split_slerp"})


def register() -> MergeMethod:
    """Register the mergekit method ``m2n2`` now (imports mergekit); idempotent.

    Returns the registered method object.
    """
    from m2n2_plugin.merge.method import register as _register

    return _register()


def __getattr__(name: str) -> object:
    # PEP 562: the kernel pulls in torch, so it is imported on first access only.
    if name in _KERNEL_EXPORTS:
        from m2n2_plugin.merge import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _KERNEL_EXPORTS)


_autoload.install()
