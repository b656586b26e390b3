"""How many fitness documents does exact early rejection save, and is the run unchanged?

One seeded M2N2 study (InMemoryStorage, one worker) is run without early rejection (every
trial scored on all ``--docs`` documents) and then once per chunk order with it: children are
scored ``--chunk`` documents at a time and raise ``optuna.TrialPruned`` as soon as
``Archive.can_enter`` proves they cannot enter the archive (seeds are never pruned: a pruned
seed is issued again). After every trial the archives (member trial number per slot, score
rows) must be identical to the full run's; the script exits with status 1 if one is not. It
prints the documents evaluated, the ratio full / early and the wall time.

The task (``--task difficulty``, the default). Documents have a fixed difficulty in [0, 1). Two
seeds are specialists: each solves the documents of its half that are easier than 0.75 (a
logistic edge), and those of the other half easier than 0.2. A child of parents A and B takes
each document's 0/1 outcome from B with probability ``t_j`` (``mix_ratio`` before
``split_point * N``, ``1 - mix_ratio`` after, as split-point SLERP weighs B) and from A
otherwise; the merge then loses 5 % of those solves, and luck adds a few, almost only among
easy documents, so a quarter of the documents stays unsolved by every member, as hard test
items do. ``--broken p``: with probability p the merge is broken and keeps a fifth of its
solves. ``--task crossover``: outcomes from A or B as above, then 2 % of the bits flip either
way. ``--task interpolate``: document j solved with probability
``0.03 + 0.9 ((1 - t_j) A_j + t_j B_j)``. Every draw comes from a stream fixed by the trial
number, so both runs see the same child for the same trial and parents.

Chunk orders (``--orders``): ``rarest``: the documents the archive solves least first (they are
worth most to the child's best case, so failing them lowers it fastest); ``parents``: first the
documents neither parent solves (where the child most likely fails), rarest first among equals;
``oracle``: the child's failures first -- it peeks at the scores, so it is no usable order but
the most any order can save. Every order is exact; it only changes how soon a rejection is
proven. For alpha <= 1 no exact test can reject sooner than ``can_enter`` does (its best case is
itself a possible outcome), so ``oracle`` bounds what early rejection saves on the task.

    python benchmarks/bench_early_rejection.py                     # 600 trials, 200 documents
    python benchmarks/bench_early_rejection.py --trials 3000 --archive-size 5 --chunk 5

Measured (2-core shared VM, Python 3.11, Optuna 5.0.0; 200 documents, chunk 10, alpha 1;
documents evaluated, full / early; archives identical after every trial in every run):

    setting                      dropped  rarest  parents  oracle
    600 trials, archive 20         63 %   x1.21    x1.29   x1.56
    3000 trials, archive 20        83 %   x1.39    x1.55   x2.08
    600 trials, archive 10         76 %   x1.33    x1.42   x1.78
    600 trials, archive 5          87 %   x1.52    x1.59   x2.01
    600 trials, --broken 0.3       64 %   x1.31    x1.37   x1.54
    600 trials, --task crossover   41 %   x1.14    x1.23   x1.39
    600 trials, alpha 0            66 %   x1.19    x1.24   x1.55

Why not more. A rejection needs the child's best case, every unevaluated document solved, to
fall below the weakest member's shared fitness (about 7 of the 200 documents' worth with 20
members). A child that solves nothing is rejected after 74 documents (the 52 nobody solves,
then 22); but most dropped children are close to the weakest member, and then nearly all of
their failures must be seen first. So the saving grows with the share of children dropped
(later in a run, smaller archives) and with how far below the weakest member they fall.
``can_enter`` costs about 0.1 ms a call (20 x 200 archive); the longer wall time of the early
runs here is those calls against a free synthetic evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

try:
    from m2n2_plugin import hub as m2n2
except ImportError:  # the plugin is not installed: load the Optuna Hub package from the tree
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import optunahub

    _root = Path(__file__).resolve().parents[1] / "hub_package"
    m2n2 = optunahub.load_local_module("samplers/m2n2", registry_root=str(_root))


TASKS = ("difficulty", "crossover", "interpolate")
ORDERS = ("rarest", "parents", "oracle")


def doc_difficulty(n_docs: int, seed: int) -> np.ndarray:
    """A fixed difficulty in [0, 1) per document (the same for every model)."""
    return np.random.default_rng([seed, 2**31]).random(n_docs)


def child_scores(
    sampler: Any, trial: optuna.Trial, args: argparse.Namespace, difficulty: np.ndarray
) -> np.ndarray:
    """The trial's 0/1 score on every document (what a full evaluation would return)."""
    n_docs = int(args.docs)
    rng = np.random.default_rng([args.seed, trial.number])
    mix_ratio = trial.suggest_float("mix_ratio", 0.0, 1.0)
    split_point = trial.suggest_float("split_point", 0.0, 1.0)
    parents = sampler.parents(trial)
    docs = np.arange(n_docs)
    own_niche = (docs < n_docs // 2) == (sampler.seed_index(trial) == 0)
    if parents is None and args.task == "difficulty":
        # A specialist: solves the documents of its niche that are not too hard.
        ability = np.where(own_niche, 0.75, 0.2)
        chance = 1.0 / (1.0 + np.exp((difficulty - ability) / 0.06))
        return (rng.random(n_docs) < chance).astype(float)
    if parents is None:
        return (rng.random(n_docs) < np.where(own_niche, 0.85, 0.15)).astype(float)
    archive = sampler.archive(trial.study)
    rows = dict(zip(archive.members, archive.scores, strict=True))
    a: np.ndarray = rows[parents[0]]
    b: np.ndarray = rows[parents[1]]
    weight_b = np.where(docs < split_point * n_docs, mix_ratio, 1.0 - mix_ratio)
    if args.task == "interpolate":
        skill = 0.03 + 0.9 * ((1.0 - weight_b) * a + weight_b * b)
        scores: np.ndarray = (rng.random(n_docs) < skill).astype(float)
        return scores
    # crossover: each document's outcome comes from B with probability weight_b, else from A.
    inherited = np.where(rng.random(n_docs) < weight_b, b, a)
    if args.task == "crossover":  # then a few bits flip, either way (2 % each)
        return np.where(rng.random(n_docs) < 0.02, 1.0 - inherited, inherited)
    # difficulty: merging loses 5 % of the inherited solves; luck solves a few more, almost
    # only among the easy documents (a hard document nobody solves stays unsolved).
    lost = rng.random(n_docs) < 0.05
    lucky = rng.random(n_docs) < 0.3 / (1.0 + np.exp((difficulty - 0.35) / 0.05))
    scores = np.where(inherited == 1.0, ~lost, lucky).astype(float)
    if rng.random() < float(args.broken):  # a broken merge keeps a fifth of its solves
        scores *= rng.random(n_docs) < 0.2
    return scores


def chunk_order(
    archive: Any, parents: tuple[int, int], how: str, scores: np.ndarray
) -> np.ndarray:
    """Document indices in the order they are scored (``scores`` only for ``oracle``)."""
    load = archive.slot_scores.sum(axis=0)
    if how == "oracle":
        return np.lexsort((load, scores))
    if how == "rarest":
        return np.argsort(load, kind="stable")
    rows = dict(zip(archive.members, archive.scores, strict=True))
    parents_solve = rows[parents[0]] + rows[parents[1]]
    return np.lexsort((load, parents_solve))  # last key first: parents' solves, then load


def make_objective(
    sampler: Any, args: argparse.Namespace, early: bool, order: str, counts: dict[str, int]
) -> Callable[[optuna.Trial], float]:
    difficulty = doc_difficulty(args.docs, args.seed)

    def objective(trial: optuna.Trial) -> float:
        scores = child_scores(sampler, trial, args, difficulty)
        parents = sampler.parents(trial)
        if not early or parents is None:  # seeds are never pruned (a pruned seed is reissued)
            counts["docs"] += args.docs
            sampler.set_scores(trial, scores)
            return float(scores.mean())
        archive = sampler.archive(trial.study)
        ranked = chunk_order(archive, parents, order, scores)
        seen = np.full(args.docs, np.nan)
        evaluated = np.zeros(args.docs, dtype=bool)
        for start in range(0, args.docs, args.chunk):
            chunk = ranked[start : start + args.chunk]
            seen[chunk] = scores[chunk]  # evaluate these documents
            evaluated[chunk] = True
            counts["docs"] += chunk.size
            if not evaluated.all() and not archive.can_enter(seen, evaluated):
                counts["pruned"] += 1
                raise optuna.TrialPruned()
        sampler.set_scores(trial, seen)
        return float(seen.mean())

    return objective


def run(args: argparse.Namespace, early: bool, order: str) -> dict[str, Any]:
    sampler = m2n2.M2N2Sampler(
        archive_size=args.archive_size, alpha=args.alpha, n_seeds=2, seed=args.seed
    )
    study = optuna.create_study(
        sampler=sampler, storage=optuna.storages.InMemoryStorage(), direction="maximize"
    )
    history: list[tuple[list[int | None], np.ndarray]] = []

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        archive = sampler.archive(study)
        history.append((list(archive.slots), archive.scores.copy()))

    counts = {"docs": 0, "pruned": 0}
    start = time.perf_counter()
    study.optimize(
        make_objective(sampler, args, early, order, counts),
        n_trials=args.trials,
        callbacks=[record],
    )
    seconds = time.perf_counter() - start
    archive = sampler.archive(study)
    return {
        "history": history,
        "docs": counts["docs"],
        "pruned": counts["pruned"],
        "n_folded": archive.n_folded,
        "coverage": archive.coverage,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=600)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--archive-size", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--orders", default="rarest,parents,oracle")
    parser.add_argument("--task", choices=TASKS, default="difficulty")
    parser.add_argument("--broken", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    orders = args.orders.split(",")
    if not set(orders) <= set(ORDERS):
        parser.error(f"--orders: choose from {', '.join(ORDERS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    full = run(args, early=False, order="")
    children = args.trials - 2
    ever_kept = {n for slots, _ in full["history"] for n in slots if n is not None}
    dropped = full["n_folded"] - len(ever_kept)
    print(
        f"{args.trials} trials ({children} children), {args.docs} documents, archive "
        f"{args.archive_size}, alpha {args.alpha}, task {args.task}, broken {args.broken}, "
        f"chunk {args.chunk}"
    )
    print(
        f"full evaluation: {full['docs']} documents, {full['seconds']:.2f} s; "
        f"{dropped} children dropped ({dropped / children:.0%}), final coverage "
        f"{full['coverage']:.3f}"
    )
    print(f"{'order':<8} {'documents':>9} {'full/early':>10} {'pruned':>7} {'time':>7}  identical")
    status = 0
    for order in orders:
        early = run(args, early=True, order=order)
        pairs = zip(full["history"], early["history"], strict=True)
        identical = all(
            slots_f == slots_e and np.array_equal(scores_f, scores_e)
            for (slots_f, scores_f), (slots_e, scores_e) in pairs
        )
        status |= not identical
        print(
            f"{order:<8} {early['docs']:>9} {full['docs'] / early['docs']:>9.2f}x "
            f"{early['pruned']:>7} {early['seconds']:>6.2f}s  {identical}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
