"""Let ``mergekit-yaml`` write its model card offline for model folders that exist here.

mergekit 0.1.5's card step (``mergekit.card.is_hf``) asks the Hugging Face Hub whether a
relative path with one slash, such as ``models/a``, is a Hub repo, even when that folder exists
on disk. Offline (``HF_HUB_OFFLINE=1``, or no network) huggingface_hub raises, and
``mergekit-yaml`` fails after the merge is done. mergekit's loader reads an existing local folder
first, so that folder is what was merged: the card should name it as local without asking.

Standard library only: the start-up hook (:mod:`m2n2_plugin._autoload`) applies it the moment
``mergekit.card`` is imported, without importing anything of mergekit itself.
"""

from __future__ import annotations

import os

# typing is not imported at run time: this module is on the start-up hook's path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType


def local_folders_are_local(card: ModuleType) -> None:
    """Wrap ``card.is_hf`` so that an existing folder is local; other paths are asked about as
    before. Idempotent."""
    asks_hub: Callable[[str], bool] = card.is_hf
    if getattr(asks_hub, "m2n2_local_first", False):
        return

    def is_hf(path: str) -> bool:
        return not os.path.isdir(path) and asks_hub(path)

    is_hf.m2n2_local_first = True  # type: ignore[attr-defined]
    is_hf.__doc__ = asks_hub.__doc__
    card.is_hf = is_hf
