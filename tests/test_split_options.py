"""``search.split_over: differing``: split points drawn only where the seed models differ."""

from __future__ import annotations

import math
import random
import subprocess
from pathlib import Path

import pytest
import torch
from evolve_workspace import build_workspace
from evolve_workspace import rebuild_lineage
from evolve_workspace import write_config
from safetensors.torch import load_file
from safetensors.torch import save_file

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.layout import ModelLayout
from m2n2_plugin.merge.split_space import SplitSpace

EMBED = "model.embed_tokens.weight"


def test_split_space_maps_a_draw_onto_the_chosen_tensors_only() -> None:
    layout = ModelLayout(
        spans={"emb": (0, 100), "a": (100, 10), "frozen": (110, 5), "b": (115, 30)},
        shapes={"emb": (100,), "a": (10,), "frozen": (5,), "b": (30,)},
    )
    everywhere = SplitSpace.over(layout)
    assert everywhere.split_point(0.37) == 0.37  # the paper's draw, untouched
    space = SplitSpace.over(layout, ["a", "b"])
    assert space.size == 40
    moving = [i for i in range(100, 110)] + [i for i in range(115, 145)]
    # The k-th moving parameter (k = floor(u * 40)) is the first after the split, and the
    # model-wide split point gives that index back through the one split rule.
    rng = random.Random(0)
    for u in [0.0, 0.2499, 0.25, 0.5, 0.999999] + [rng.random() for _ in range(500)]:
        index = layout.split_index(space.split_point(u))
        assert index == moving[math.floor(u * 40)], u
    assert space.split_point(1.0) == 1.0
    # Each moving parameter is hit by an equal share of the draws.
    hits = [layout.split_index(space.split_point((k + 0.5) / 40)) for k in range(40)]
    assert hits == moving
    with pytest.raises(M2N2ConfigError, match="no tensor 'nope'"):
        SplitSpace.over(layout, ["a", "nope"])
    with pytest.raises(M2N2ConfigError, match="at least one tensor"):
        SplitSpace.over(layout, [])


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny workspace, plus three seeds that share one embedding (frozen in fine-tuning)."""
    root = build_workspace(tmp_path_factory.mktemp("split"))
    shared = load_file(str(root / "m0" / "model.safetensors"))[EMBED]
    for i in range(3):
        folder = root / f"f{i}"
        subprocess.run(["cp", "-r", str(root / f"m{i}"), str(folder)], check=True)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[EMBED] = shared.clone()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (root / "frozen.yml").write_text(
        "merge_method: slerp\nbase_model: f0\nmodels:\n  - model: f0\n  - model: f1\n"
        "  - model: f2\nparameters:\n  t: 0.5\ndtype: float32\n"
    )
    return root


def test_differing_splits_skip_the_shared_embedding_and_rebuild(frozen: Path, tmp_path) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = write_config(
        frozen,
        "differ",
        mergekit_config="frozen.yml",
        search__n_trials=14,
        search__split_over="differing",
    )
    run = evolve(cfg, progress=False)
    space = run.split_space
    seeds = [load_file(str(frozen / f"f{i}" / "model.safetensors")) for i in range(3)]
    same = [k for k, v in seeds[0].items() if all(torch.equal(v, o[k]) for o in seeds[1:])]
    # The shared embedding, and the norms (all ones in an untrained Llama), are left out.
    assert EMBED in same and len(same) > 1
    assert space.size == space.total - sum(seeds[0][k].numel() for k in same)
    children = [t for t in run.study.trials if "m2n2.parents" in t.user_attrs]
    assert children
    for t in children:
        drawn, (used,) = t.params["split_point"], t.user_attrs["m2n2.split_point"]
        assert used == space.split_point(drawn)
        index = math.floor(used * space.total)
        assert any(o <= index < o + n for o, n in space.spans) or used == 1.0, t.number
    # The embedding is the same in every member written, as in the seeds.
    shared = load_file(str(frozen / "f0" / "model.safetensors"))[EMBED]
    for path in (run.out / "archive").glob("*.safetensors"):
        assert torch.equal(load_file(str(path))[EMBED], shared), path.name
    # The recipe says the split point the merge used: mergekit rebuilds the best model.
    docs = rebuild_lineage(run.out, tmp_path)
    used = {p for t in children for p in t.user_attrs["m2n2.split_point"]}
    assert {d["parameters"]["split_point"] for d in docs} <= used
    # The option is part of the study: resuming with the paper's draw is refused.
    back = write_config(frozen, "differ", mergekit_config="frozen.yml", search__n_trials=16)
    with pytest.raises(M2N2Error, match="different 'search'"):
        evolve(back, progress=False)


def test_differing_needs_seeds_that_differ(frozen: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    (frozen / "same.yml").write_text(
        "merge_method: slerp\nbase_model: f0\nmodels:\n  - model: f0\n  - model: f0\n"
        "parameters:\n  t: 0.5\ndtype: float32\n"
    )
    cfg = write_config(
        frozen, "same_run", mergekit_config="same.yml", search__split_over="differing"
    )
    with pytest.raises(M2N2Error, match="seed models that differ"):
        evolve(cfg, progress=False)
    assert not (frozen / "out-same_run" / "study.db").exists()


def test_the_default_leaves_the_fingerprint_as_before(frozen: Path) -> None:
    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.run_state import fingerprint

    cfg = load_config(write_config(frozen, "fp", mergekit_config="frozen.yml"))
    assert "split_over" not in fingerprint(cfg, [], _NoDocs())["search"]
    cfg = load_config(
        write_config(frozen, "fp", mergekit_config="frozen.yml", search__split_over="differing")
    )
    assert fingerprint(cfg, [], _NoDocs())["search"]["split_over"] == "differing"


class _NoDocs:
    ids: dict = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("splits"))


def test_several_split_points_per_child_rebuild(workspace: Path, tmp_path: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    run = evolve(
        write_config(workspace, "three", search__n_trials=14, search__split_points=3),
        progress=False,
    )
    children = [t for t in run.study.trials if "m2n2.parents" in t.user_attrs]
    assert children
    for t in children:
        assert {"split_point", "split_point_2", "split_point_3"} <= set(t.params)
    log = (run.out / "trials.log").read_text()
    assert "split_point=0." in log and log.count("/") >= 2 * len(children)
    for doc in rebuild_lineage(run.out, tmp_path):
        assert {"split_point", "split_point_2", "split_point_3"} <= set(doc["parameters"])


def test_split_points_config_errors(workspace: Path) -> None:
    from m2n2_plugin.search.config import load_config

    for value, message in [(0, "greater than or equal to 1"), (9, "less than or equal to 4")]:
        with pytest.raises(M2N2Error, match=message):
            load_config(write_config(workspace, "bad", search__split_points=value))
    with pytest.raises(M2N2Error, match="needs use_split_point: true"):
        load_config(
            write_config(workspace, "bad", search__split_points=2, search__use_split_point=False)
        )
