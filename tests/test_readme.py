"""The README's code blocks run as written, and its claims about the dashboard hold.

Each block is read from README.md by its section, so an edit to the README that breaks a
snippet, or a config option added without a line in the README's listing, fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from evolve_workspace import build_workspace
from evolve_workspace import worker_env
from evolve_workspace import write_config

from m2n2_plugin.search.config import EvolveConfig
from m2n2_plugin.search.config import FitnessConfig
from m2n2_plugin.search.config import SearchConfig
from m2n2_plugin.search.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    """The text of the README's ``## heading`` section, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section '## {heading}'"
    return match.group(1)


def blocks(heading: str, lang: str) -> list[str]:
    """The fenced ``lang`` code blocks of a README section, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", section(heading), re.M | re.S)


def test_optuna_snippet_runs_as_pasted(tmp_path: Path) -> None:
    (code,) = blocks("The Optuna sampler", "python")
    # From a folder outside the repository, as a user pastes it.
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "seeds: 0.50 / 0.50"
    found = re.fullmatch(r"best member: trial (\d+), (\d\.\d\d) of the examples solved", lines[1])
    assert found, lines
    solved = float(found.group(2))
    assert solved >= 0.8  # the merge fused the two halves
    # The README says what it prints.
    text = " ".join(section("The Optuna sampler").split())
    assert f"It prints `seeds: 0.50 / 0.50` and a best member that solves {solved:.2f}" in text
    coverage = re.fullmatch(r"archive members: \[[\d, ]+\], coverage (\d\.\d\d)", lines[2])
    assert coverage and float(coverage.group(1)) >= solved, lines


@pytest.mark.slow
def test_mergekit_yaml_runs_offline_as_written(tmp_path: Path) -> None:
    from mergekit.config import MergeConfiguration

    (commands,) = blocks("The `m2n2` merge method in `mergekit-yaml`", "bash")
    (listing,) = blocks("The `m2n2` merge method in `mergekit-yaml`", "yaml")
    assert "make_parents.py /tmp/tiny-merge" in commands
    assert "mergekit-yaml /tmp/tiny-merge/m2n2.yml /tmp/tiny-merge/merged" in commands
    folder = tmp_path / "tiny-merge"
    env = worker_env()
    make = [sys.executable, str(ROOT / "examples/tiny_merge/make_parents.py"), str(folder)]
    proc = subprocess.run(make, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # The README's config is the one make_parents.py writes (paths moved to this test's folder).
    shown = yaml.safe_load(listing.replace("/tmp/tiny-merge", str(folder)))
    assert shown == yaml.safe_load((folder / "m2n2.yml").read_text())
    MergeConfiguration.model_validate(shown)
    merge = ["mergekit-yaml", str(folder / "m2n2.yml"), str(folder / "merged")]
    proc = subprocess.run(merge, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (folder / "merged" / "model.safetensors").is_file()


def _fields(model: type[Any]) -> set[str]:
    return {name for name in model.model_fields if name != "base_dir"}


def test_evolve_config_blocks_parse_and_list_every_option() -> None:
    minimal, listing = blocks("`m2n2 evolve`", "yaml")
    for text in (minimal, listing):
        parse_config(yaml.safe_load(text), ROOT)
    data = yaml.safe_load(listing)
    assert set(data) == _fields(EvolveConfig)
    assert set(data["fitness"]) == _fields(FitnessConfig)
    assert set(data["search"]) == _fields(SearchConfig)
    # Every option that has a default is shown with it.
    for model, shown in ((FitnessConfig, data["fitness"]), (SearchConfig, data["search"])):
        for name, field in model.model_fields.items():
            if not field.is_required():
                assert shown[name] == field.default, f"{model.__name__}.{name}"
    assert data["output_dir"] is None


def test_quick_start_installs_the_dashboard_extra() -> None:
    (block,) = blocks("Quick start", "bash")
    assert 'pip install torch==2.13.0 -e ".[dashboard]"' in block
    assert "m2n2 example m2n2-example" in block


def _graphs(out: Path) -> set[str]:
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{out / 'study.db'}")
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    return set(get_plotly_graph_objects(system_attrs))


@pytest.mark.slow
def test_rerun_puts_the_plots_into_a_study_made_without_the_dashboard(tmp_path: Path) -> None:
    """The README: installed the extra after a run? Rerun the same command."""
    pytest.importorskip("optuna_dashboard")
    pytest.importorskip("plotly")
    from optuna_dashboard import get_note

    root = build_workspace(tmp_path / "ws")
    cfg = write_config(root, "dash", search__n_trials=4)
    run = (
        "import sys; {block}from m2n2_plugin.cli import main; "
        f"sys.exit(main(['evolve', {str(cfg)!r}, '--no-progress']))"
    )
    # ``sys.modules[name] = None`` is Python's own way to make a module unimportable: the run
    # made before the extra was installed.
    before = run.format(block="sys.modules['optuna_dashboard'] = None; ")
    proc = subprocess.run(
        [sys.executable, "-c", before], capture_output=True, text=True, env=worker_env()
    )
    assert proc.returncode == 0, proc.stderr
    out = root / "out-dash"
    assert _graphs(out) == set()
    summary = json.loads((out / "summary.json").read_text())

    proc = subprocess.run(
        [sys.executable, "-c", run.format(block="")],
        capture_output=True,
        text=True,
        env=worker_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert _graphs(out) == {"m2n2-fitness", "m2n2-coverage", "m2n2-lineage"}
    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4  # nothing was run again
    assert f"Best archive member: trial {summary['best_trial']}**" in get_note(study)
