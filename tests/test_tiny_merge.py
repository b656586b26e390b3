"""examples/tiny_merge as its docstring runs it: build parents, ``mergekit-yaml``, ``--check``.

The check ends with a verdict: the merged tensors are exactly the in-memory ``m2n2`` merge of
the parents its ``mergekit_config.yml`` names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import mergekit_yaml_executable

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "tiny_merge" / "make_parents.py"

pytestmark = pytest.mark.slow


def test_check_prints_a_verdict(tmp_path: Path) -> None:
    exe = mergekit_yaml_executable()
    if not exe:
        pytest.fail("mergekit-yaml is not installed (it comes with the package)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(sys.executable, str(SCRIPT), str(tmp_path))
    run(exe, str(tmp_path / "m2n2.yml"), str(tmp_path / "merged"))
    out = run(sys.executable, str(SCRIPT), "--check", str(tmp_path / "merged")).stdout
    assert out.splitlines()[-1] == (
        "verdict: ok, all 21 tensors are exactly "
        "m2n2(parent_a, parent_b, mix_ratio=0.3, split_point=0.4)"
    )
