"""What ``m2n2 evolve`` leaves behind: the best model, its lineage, held-out scores, plots.

* ``<out>/best/``: a full Hugging Face model folder (config, tokenizer, safetensors) with a
  model card naming the seeds, the lineage and the held-out scores, and ``lineage.yml``;
* ``lineage.yml``: a ``mergekit-multi`` file of ``merge_method: m2n2`` merges that rebuilds
  the best model from the seed models (``mergekit-multi lineage.yml --intermediate-dir work
  --out-path rebuilt``);
* ``<out>/plots/fitness.png`` and ``<out>/plots/coverage.png``; ``<out>/summary.json``.

Held-out scores are cached in the study (user attrs), so a resumed run does not re-evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import yaml

if TYPE_CHECKING:
    from m2n2_plugin.evolve import Run


def _trial(run: Run, number: int) -> Any:
    storage = run.study._storage
    tid = storage.get_trial_id_from_study_id_trial_number(run.study._study_id, number)
    return storage.get_trial(tid)


def lineage_docs(run: Run, number: int) -> list[dict[str, Any]]:
    """mergekit-multi documents that rebuild trial ``number``'s model from the seeds.

    Ancestors come first (each merge once, however often it is reused); the last document is
    the model itself and has no ``name``, so ``--out-path`` receives it.
    """
    docs: dict[int, dict[str, Any]] = {}
    ref: dict[int, str] = {}
    stack = [number]
    while stack:
        n = stack[-1]
        if n in ref:
            stack.pop()
            continue
        trial = _trial(run, n)
        attrs = trial.user_attrs
        if "m2n2.seed" in attrs:
            ref[n] = str(run.seeds[int(attrs["m2n2.seed"])].path)
            stack.pop()
            continue
        a, b = attrs["m2n2.parents"]
        todo = [p for p in (a, b) if p not in ref]
        if todo:
            stack.extend(todo)
            continue
        params: dict[str, Any] = {
            "mix_ratio": float(trial.params["mix_ratio"]),
            "split_point": float(trial.params["split_point"]),
        }
        if run.cfg.search.granularity != "element":
            params["granularity"] = run.cfg.search.granularity
        doc: dict[str, Any] = {
            "name": f"trial_{n:06d}",
            "merge_method": "m2n2",
            "base_model": ref[a],
            "models": [{"model": ref[a]}, {"model": ref[b]}],
            "parameters": params,
        }
        for key in ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template"):
            if key in run.carried:
                doc[key] = run.carried[key]
        docs[n] = doc
        ref[n] = doc["name"]
        stack.pop()
    ordered = list(docs.values())
    if ordered and ordered[-1]["name"] == f"trial_{number:06d}":
        ordered[-1] = {k: v for k, v in ordered[-1].items() if k != "name"}
    return ordered


def write_lineage(run: Run, number: int, path: Path) -> int:
    """Write the lineage YAML; returns the number of merges in it."""
    docs = lineage_docs(run, number)
    header = (
        f"# Lineage of trial {number} of study {run.study.study_name!r}: every m2n2 merge from\n"
        "# the seed models. Rebuild with:\n"
        "#   mergekit-multi lineage.yml --intermediate-dir work --out-path rebuilt\n"
    )
    if not docs:
        header += "# This model is a seed: no merge is needed.\n"
    body = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
    path.write_text(header + body)
    return len(docs)


def heldout_scores(run: Run, load: Callable[[], None], key: str) -> dict[str, float]:
    """Mean held-out score per task of the model ``load()`` puts in place (cached under
    ``key`` in the study, so a resumed run does not evaluate it again)."""
    if not len(run.heldout_docs):
        return {}
    cache = dict(run.study.user_attrs.get("m2n2.heldout", {}))
    if key not in cache:
        load()
        scores = run.fitness.score(run.lm, run.heldout_docs)
        cache[key] = run.heldout_docs.task_means(scores)
        run.study.set_user_attr("m2n2.heldout", cache)
    return cache[key]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; the old one is removed only afterwards."""
    old = final.with_name(f".{final.name}-old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _model_card(
    run: Run, best: int, fitness: float, heldout: dict[str, dict[str, float]], n_merges: int
) -> str:
    seeds = "\n".join(f"- `{s.name}`" for s in run.seeds)
    rows = "\n".join(
        f"| {who} | " + " | ".join(f"{v[t]:.4f}" for t in [*run.heldout_docs.ids, "mean"]) + " |"
        for who, v in heldout.items()
    )
    cols = [*run.heldout_docs.ids, "mean"]
    table = (
        "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n" + rows
        if heldout
        else "No held-out documents were configured."
    )
    n_docs = len(run.heldout_docs)
    return f"""---
library_name: transformers
tags:
- merge
- mergekit
- m2n2
---
# M2N2 merge (trial {best} of study `{run.study.study_name}`)

Evolved with M2N2 (Model Merging of Natural Niches): split-point SLERP merges of an archive of
{run.cfg.search.archive_size} models under resource competition, scored per document with
lm-eval ({", ".join(run.cfg.fitness.tasks)}, metric `{run.cfg.fitness.metric}`).

## Seeds
{seeds}

## Lineage
{n_merges} `m2n2` merge(s) from the seeds; `lineage.yml` rebuilds this model with
`mergekit-multi lineage.yml --intermediate-dir work --out-path rebuilt`.

## Scores
Mean fitness score ({len(run.fitness_docs)} fitness documents): {fitness:.4f}

Held-out documents ({n_docs}, never used for selection):

{table}
"""


def _plots(run: Run, arch: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist_path = run.out / "history.jsonl"
    rows = (
        [json.loads(line) for line in hist_path.read_text().splitlines()]
        if hist_path.is_file()
        else []
    )
    last: dict[int, dict[str, Any]] = {}
    for r in rows:  # a resumed run may repeat a trial's line; keep the last
        last[r["trial"]] = r
    rows = [last[k] for k in sorted(last)]
    plots = run.out / "plots"
    plots.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if rows:
        x = [r["trial"] for r in rows]
        ax.scatter(
            x,
            [np.nan if r["value"] is None else r["value"] for r in rows],
            s=6,
            alpha=0.4,
            label="child mean score",
        )
        ax.plot(x, [r["archive_best"] for r in rows], label="archive best")
        ax.plot(x, [r["archive_mean"] for r in rows], label="archive mean")
        ax.plot(x, [r["coverage"] for r in rows], "--", label="coverage")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (mean per-document score)")
    ax.set_title("M2N2 fitness over trials")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(plots / "fitness.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(arch.members), 2) + 1.5))
    if len(arch.members):
        ax.imshow(
            arch.scores, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_yticks(range(len(arch.members)), [f"trial {m}" for m in arch.members])
        cov = float(arch.scores.max(axis=0).mean())
        ax.set_title(f"archive per-document scores (coverage {cov:.3f})")
    ax.set_xlabel("fitness document")
    fig.tight_layout()
    fig.savefig(plots / "coverage.png", dpi=120)
    plt.close(fig)


def write_outputs(run: Run) -> dict[str, Any]:
    """Write best model, lineage, model card, plots and summary; returns the summary."""
    arch = run.sampler.archive(run.study)
    summary: dict[str, Any] = {"output_dir": str(run.out), "archive": arch.members}
    _plots(run, arch)
    if not arch.members:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    means = arch.mean_scores
    best = arch.best()
    heldout: dict[str, dict[str, float]] = {}
    if len(run.heldout_docs):
        heldout["M2N2 best"] = heldout_scores(run, lambda: run.load_member(best), f"trial:{best}")
        for i, s in enumerate(run.seeds):
            heldout[f"seed {s.name}"] = heldout_scores(run, partial(run.load_seed, i), f"seed:{i}")
    tmp = Path(tempfile.mkdtemp(prefix=".best-tmp-", dir=run.out))
    try:
        run.load_member(best)
        run.model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        n_merges = write_lineage(run, best, tmp / "lineage.yml")
        (tmp / "README.md").write_text(
            _model_card(run, best, float(means.max()), heldout, n_merges)
        )
        _replace_dir(tmp, run.out / "best")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.update(
        {
            "best_trial": best,
            "best_fitness": float(means.max()),
            "coverage": float(arch.scores.max(axis=0).mean()),
            "heldout": heldout,
            "n_merges_in_lineage": n_merges,
        }
    )
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
