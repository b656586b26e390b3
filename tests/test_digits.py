"""Short runs of the digits experiment (examples/digits): it learns, and each ablation switch
changes exactly the behaviour it names.

Every run here goes through the real sampler (``m2n2_plugin.hub.M2N2Sampler``), Optuna and the
kernel, as ``examples/digits/run.py`` does; a few hundred children, one seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

DIGITS_DIR = Path(__file__).resolve().parents[1] / "examples" / "digits"
sys.path.insert(0, str(DIGITS_DIR))

import common  # noqa: E402
import run  # noqa: E402

from m2n2_plugin.merge.kernel import split_index  # noqa: E402
from m2n2_plugin.merge.kernel import split_slerp  # noqa: E402

CHILDREN = 300
SEED = 42


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One intra-op thread, as run.py: the matmuls are small, and several threads on a busy
    machine spin and slow each child down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset() -> common.Dataset:
    return common.load_digits_dataset()


def _run(
    dataset: common.Dataset, setting: str, method: str, archive: bool = False
) -> tuple[dict, list[run.ChildInfo], list[tuple[list[int], np.ndarray]]]:
    """Run ``CHILDREN`` children; return the record, every child, and (optionally) the archive
    (members, score matrix) each child was drawn from."""
    children: list[run.ChildInfo] = []
    archives: list[tuple[list[int], np.ndarray]] = []

    def on_child(info: run.ChildInfo) -> None:
        children.append(info)
        if archive:  # the trial is still RUNNING: this is the archive its parents came from
            arch = info.sampler.archive(info.trial.study)
            archives.append((list(arch.members), np.asarray(arch.scores)))

    rec = run.run_m2n2(setting, method, SEED, CHILDREN, dataset, CHILDREN // 3, on_child)
    return rec, children, archives


def test_dataset_and_model_match_the_paper(dataset: common.Dataset) -> None:
    assert (len(dataset.train), len(dataset.test)) == (1437, 360)
    assert float(dataset.train.x.max()) == 16.0  # pixels 0..16, not normalised
    assert common.MLPLayout().n_params == 19_210


def test_official_random_numbers() -> None:
    """Known values of ``jax.random`` (jax 0.4.31): keys exactly, normals to float precision."""
    assert common.jax_split(common.jax_key(42), 2).tolist() == [
        [2465931498, 3679230171],
        [255383827, 267815257],
    ]
    first = common.jax_normal(common.jax_split(common.jax_key(42), 2)[0], 3)
    np.testing.assert_allclose(first, [0.6333007, 0.9610921, 1.3625766], atol=1e-5)


def test_official_brute_force_baseline(dataset: common.Dataset) -> None:
    """With the official specialists the paper's brute-force SLERP number comes out (57.7 %)."""
    rec = run.run_bruteforce(SEED, 2000, dataset, 1000)
    assert 0.55 <= rec["final_test_acc"] <= 0.60


def test_scratch_run_rises_well_above_chance(dataset: common.Dataset) -> None:
    rec = run.run_m2n2("scratch", "m2n2", SEED, 600, dataset, 100)
    curve = rec["curve"]
    assert curve["children"][-1] == 600
    assert curve["test_acc"][0] < 0.15  # N(0, 0.01^2) models start near chance (10 %)
    assert rec["final_train_acc"] > 0.25
    assert rec["final_test_acc"] > 0.25
    shares = rec["time_s"]
    assert abs(sum(shares.values()) - rec["wall_s"]) < 1e-6


def test_no_split_point_gives_single_ratio_slerps(dataset: common.Dataset) -> None:
    _, on, _ = _run(dataset, "pretrained", "m2n2")
    _, off, _ = _run(dataset, "pretrained", "no_split")
    n = common.MLPLayout().n_params
    assert len({round(c.split_point, 12) for c in on}) > CHILDREN // 2
    assert all(0.0 <= c.split_point < 1.0 for c in on)
    assert all(c.split_point == 1.0 for c in off)
    for c in off[:20]:  # plain SLERP: one ratio for every parameter (no mutation here)
        assert c.noise is None
        plain = split_slerp(c.parent_a, c.parent_b, c.mix_ratio, n)
        torch.testing.assert_close(c.child, plain, rtol=0, atol=0)
    c = on[0]
    split = split_slerp(c.parent_a, c.parent_b, c.mix_ratio, split_index(c.split_point, n))
    torch.testing.assert_close(c.child, split, rtol=0, atol=0)


def test_no_crossover_children_are_mutated_parent_a(dataset: common.Dataset) -> None:
    _, off, _ = _run(dataset, "scratch", "no_crossover")
    for c in off:
        assert c.noise is not None
        torch.testing.assert_close(c.child, c.parent_a + common.MUTATION_STD * c.noise)
    _, on, _ = _run(dataset, "scratch", "m2n2")
    differs = [
        not torch.allclose(c.child, c.parent_a + common.MUTATION_STD * c.noise)
        for c in on
        if c.noise is not None
    ]
    assert all(differs)


def _b_solves_what_a_fails(
    c: run.ChildInfo, members: list[int], scores: np.ndarray
) -> tuple[bool, bool]:
    """(B is right somewhere A is wrong, some member is) for one child's draw."""
    a, b = c.parents
    s_a = scores[members.index(a)]
    s_b = scores[members.index(b)]
    return bool((s_b > s_a).any()), bool((scores > s_a).any())


def test_attraction_draws_b_where_a_fails(dataset: common.Dataset) -> None:
    _, on, arch_on = _run(dataset, "scratch", "m2n2", archive=True)
    for c, (members, scores) in zip(on, arch_on, strict=True):
        b_helps, anyone_helps = _b_solves_what_a_fails(c, members, scores)
        assert c.parents[0] != c.parents[1] or len(members) == 1
        assert b_helps or not anyone_helps  # attraction g(A, B) > 0 whenever possible
    _, off, arch_off = _run(dataset, "scratch", "no_attraction", archive=True)
    blind = [
        not _b_solves_what_a_fails(c, m, s)[0] and _b_solves_what_a_fails(c, m, s)[1]
        for c, (m, s) in zip(off, arch_off, strict=True)
    ]
    same = [c.parents[0] == c.parents[1] for c in off]
    assert any(same)  # A and B i.i.d. (with replacement): A == B happens
    assert any(blind)  # B drawn by fitness alone, blind to what A fails


def test_alpha_zero_is_a_ga_by_raw_score(dataset: common.Dataset) -> None:
    """alpha 0: the archive is the top 20 by raw accuracy; alpha 1 keeps weaker specialists."""

    def survivors_vs_rest(method: str) -> tuple[float, float]:
        _, kids, _ = _run(dataset, "scratch", method)
        sampler, study = kids[-1].sampler, kids[-1].trial.study
        arch = sampler.archive(study)
        acc = {c.trial.number: float(c.scores.mean()) for c in kids}
        members = set(arch.members)
        worst_member = float(np.min(arch.scores.mean(axis=1)))
        best_outsider = max(v for k, v in acc.items() if k not in members)
        return worst_member, best_outsider

    worst, outsider = survivors_vs_rest("ga")
    assert worst >= outsider
    worst, outsider = survivors_vs_rest("m2n2")
    assert worst < outsider
