"""Bad ``m2n2`` configs through the real ``mergekit-yaml``: one line, non-zero exit, no output.

mergekit-yaml lets exceptions escape as tracebacks. The plugin's checks run while mergekit
plans the merge (input validation, parameter resolution), before the output directory is
created, and raise a ``click.ClickException``, which click prints as ``Error: ...`` and turns
into exit status 1. The runs go side by side, as in test_merge_method_cli.py.
"""

from __future__ import annotations

import pytest
from tiny_models import MergekitRun
from tiny_models import m2n2_config
from tiny_models import make_tiny_llama
from tiny_models import mergekit_yaml_executable
from tiny_models import run_all
from tiny_models import tiny_llama_config

pytestmark = pytest.mark.slow  # subprocesses: see pyproject's markers

CASES = {
    "three_models": "expects exactly two models",
    "no_base_model": "base_model is required",
    "mix_ratio_1.5": "mix_ratio must be a number in [0, 1], got 1.5",
    "split_point_-0.1": "split_point must be a number in [0, 1], got -0.1",
    "different_shapes": "the parents have different shapes",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    exe = mergekit_yaml_executable()
    if not exe:
        pytest.skip("mergekit-yaml is not installed")
    root = tmp_path_factory.mktemp("errors")
    config = tiny_llama_config(num_hidden_layers=2)
    a = make_tiny_llama(root / "a", seed=1, config=config, tokenizer=False)
    b = make_tiny_llama(root / "b", seed=2, config=config, tokenizer=False)
    c = make_tiny_llama(root / "c", seed=3, config=config, tokenizer=False)
    wide = make_tiny_llama(
        root / "wide",
        seed=4,
        config=tiny_llama_config(num_hidden_layers=2, hidden_size=48),
        tokenizer=False,
    )
    configs = {
        "three_models": m2n2_config(a, [a, b, c], mix_ratio=0.3, split_point=0.5),
        "no_base_model": m2n2_config(None, [a, b], mix_ratio=0.3, split_point=0.5),
        "mix_ratio_1.5": m2n2_config(a, [a, b], mix_ratio=1.5, split_point=0.5),
        "split_point_-0.1": m2n2_config(a, [a, b], mix_ratio=0.3, split_point=-0.1),
        "different_shapes": m2n2_config(a, [a, wide], mix_ratio=0.3, split_point=0.5),
    }
    merges = {name: MergekitRun(root, name, cfg) for name, cfg in configs.items()}
    run_all(list(merges.values()), exe)
    return merges


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_fails_with_one_line_and_leaves_no_output(runs, case):
    run = runs[case]
    assert run.result is not None
    stderr = run.result.stderr
    assert run.result.returncode != 0
    assert "Traceback" not in stderr, stderr
    error_lines = [line for line in stderr.splitlines() if "Error" in line]
    assert len(error_lines) == 1, stderr
    assert error_lines[0].startswith("Error: m2n2: "), stderr
    assert CASES[case] in error_lines[0], stderr
    assert not run.out.exists()
