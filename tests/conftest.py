"""Shared test set-up: offline Hugging Face, and ``import tiny_models`` from any test.

The environment variables are set here, before any test module imports transformers or
huggingface_hub (they read them at import time), so nothing in the suite reaches the hub.
Reusable builders of tiny models and tokenizers live in tests/tiny_models.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
