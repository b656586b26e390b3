from __future__ import annotations

from pathlib import Path
import sys


# The tests import their helpers (m2n2_toy) from this folder, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
