"""Optional packages (the ``dashboard``, ``mlflow`` and ``wandb`` extras): installed or not.

The dashboard and the trackers are asked whether their packages are there before anything is
written, without importing them (mlflow and wandb take seconds to import).
"""

from __future__ import annotations

import importlib.util
import sys


def importable(name: str) -> bool:
    """Whether ``import name`` would find the package, without importing it (slow ones).

    A module already imported counts as is: optuna-integration swaps itself for a lazy module
    without ``__spec__``, on which ``find_spec`` raises.
    """
    if sys.modules.get(name) is not None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
