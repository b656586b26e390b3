"""What ``m2n2 evolve`` leaves behind: the best model, its lineage, held-out scores, plots.

* ``<out>/best/``: a full Hugging Face model folder (config, tokenizer, safetensors) with a
  model card naming the seeds, the lineage and the held-out scores, and ``lineage.yml``;
* ``lineage.yml``: a ``mergekit-multi`` file of ``merge_method: m2n2`` merges that rebuilds
  the best model from the seed models (``mergekit-multi lineage.yml --intermediate-dir work
  --out-path rebuilt``);
* ``<out>/plots/fitness.png``, ``<out>/plots/coverage.png`` (:mod:`m2n2_plugin.report.plots`)
  and ``<out>/plots/lineage.png`` (the best model's family tree,
  :mod:`m2n2_plugin.report.family_tree`); ``<out>/summary.json``.

It takes plain data -- the archive, the trials, the seeds, the output folder and a
:class:`Settings` -- plus two callables for what needs the resident model (evaluating held-out
scores, saving the best model), so it never sees the run itself: the search hands it what to write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.kernel import split_point_names
from m2n2_plugin.merge.models import CARRIED_KEYS
from m2n2_plugin.merge.models import CONFIG_MERGE
from m2n2_plugin.merge.models import Seed
from m2n2_plugin.report import family_tree
from m2n2_plugin.report import plots
from m2n2_plugin.report.ranking import best_member
from m2n2_plugin.report.ranking import fitness_means


@dataclass(frozen=True)
class Settings:
    """What the report says about the run (names and numbers, no live objects)."""

    study_name: str
    archive_size: int
    tasks: Sequence[str]
    metric: str
    granularity: str
    n_fitness_docs: int
    heldout_tasks: Sequence[str] = ()
    n_heldout_docs: int = 0
    carried: Mapping[str, Any] = field(default_factory=dict)
    #: How the fitness documents weigh in the competition (weights.FitnessWeights.describe).
    fitness_weights: str = ""
    #: Warnings the card must carry (e.g. fitness documents from a benchmark's test split).
    warnings: Sequence[str] = ()
    #: Documents per task, in the score vector's order (tasks as the config lists them). The
    #: totals alone made the card print one task's count as "200 in all" when two tasks had
    #: 100 each; empty: only the totals are known, and the card says "in all".
    fitness_counts: Mapping[str, int] = field(default_factory=dict)
    heldout_counts: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Per-task counts must add up to the totals: a card must not contradict itself."""
        for what, counts, total in (
            ("fitness", self.fitness_counts, self.n_fitness_docs),
            ("held-out", self.heldout_counts, self.n_heldout_docs),
        ):
            if counts and sum(counts.values()) != total:
                raise M2N2Error(
                    f"report settings: {what} documents per task {dict(counts)} add up to "
                    f"{sum(counts.values())}, not {total}"
                )


def doc_counts(counts: Mapping[str, int], total: int) -> str:
    """``"task_a: 60, task_b: 12; 72 in all"``; only the total where no task's is known."""
    if not counts:
        return f"{total} in all"
    if len(counts) == 1:
        return f"{next(iter(counts))}: {total}"
    return ", ".join(f"{task}: {n}" for task, n in counts.items()) + f"; {total} in all"


def lineage_docs(
    trials: Mapping[int, Any], seeds: Sequence[Seed], settings: Settings, number: int
) -> list[dict[str, Any]]:
    """mergekit-multi documents that rebuild trial ``number``'s model from the seeds.

    Ancestors come first (each merge once, however often it is reused); the last document is
    the model itself and has no ``name``, so ``--out-path`` receives it.
    """
    docs: dict[int, dict[str, Any]] = {}
    ref: dict[int, str] = {}
    for n in family_tree.ancestors_first(trials, number):
        trial = trials[n]
        attrs = trial.user_attrs
        if "m2n2.parents" not in attrs:
            seed = seeds[int(attrs["m2n2.seed"])]
            if seed.recipe is None:
                ref[n] = seed.reference  # hub id@rev, or local path
                continue
            # The mergekit config's own merge (search.seed_config_merge): a stage of its own.
            docs[n] = {"name": CONFIG_MERGE, **seed.recipe}
            ref[n] = CONFIG_MERGE
            continue
        a, b = (int(p) for p in attrs["m2n2.parents"])
        mix_ratio, split_point = family_tree.crossover(trial)
        params: dict[str, Any] = {"mix_ratio": mix_ratio}
        params.update(zip(split_point_names(len(split_point)), split_point, strict=True))
        if settings.granularity != "element":
            params["granularity"] = settings.granularity
        doc: dict[str, Any] = {
            "name": f"trial_{n:06d}",
            "merge_method": "m2n2",
            "base_model": ref[a],
            "models": [{"model": ref[a]}, {"model": ref[b]}],
            "parameters": params,
        }
        for key in CARRIED_KEYS:
            if key in settings.carried:
                doc[key] = settings.carried[key]
        docs[n] = doc
        ref[n] = doc["name"]
    if number in docs:  # the model itself: no name, so --out-path receives it
        docs[number] = {k: v for k, v in docs[number].items() if k != "name"}
    return list(docs.values())


def write_lineage(docs: list[dict[str, Any]], study_name: str, number: int, path: Path) -> int:
    """Write the lineage YAML; returns the number of merges in it."""
    header = (
        f"# Lineage of trial {number} of study {study_name!r}: every m2n2 merge from\n"
        "# the seed models. Rebuild with:\n"
        "#   mergekit-multi lineage.yml --intermediate-dir work --out-path rebuilt\n"
    )
    if not docs:
        header += "# This model is a seed: no merge is needed.\n"
    body = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
    path.write_text(header + body)
    return len(docs)


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


#: Card metadata tags: the Hugging Face Hub lists merges under ``merge`` / ``mergekit``.
CARD_TAGS = ["merge", "mergekit", "m2n2"]


def model_card(
    settings: Settings,
    seeds: Sequence[Seed],
    best: int,
    fitness: float,
    heldout: dict[str, dict[str, float]],
    tree: Mapping[int, family_tree.Node],
) -> Any:
    """The best model's card as a ``huggingface_hub.ModelCard``.

    Metadata the Hub reads: ``base_model`` (the seeds as named in the mergekit config, so the
    Hub draws the model tree when they are Hub ids) with ``base_model_relation: merge``, the
    tags, and a ``model-index`` with the best model's held-out score per task. The prose keeps
    what the metadata cannot say: the lineage merge by merge and the held-out table against
    every seed.
    """
    from huggingface_hub import EvalResult
    from huggingface_hub import ModelCard
    from huggingface_hub import ModelCardData

    model_name = f"m2n2-{settings.study_name}-trial-{best}"
    n_docs = settings.n_heldout_docs
    best_scores = next(iter(heldout.values()), {})

    def split(task: str) -> str:
        """The documents one task's score is the mean of: that task's, not all tasks'."""
        count = settings.heldout_counts.get(task)
        n = f"{count}" if count is not None else f"{n_docs} across the tasks"
        return f"held-out documents ({n}, never used for selection)"

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            dataset_split=split(task),
            metric_type=settings.metric,
            metric_name=settings.metric,
            metric_value=round(float(best_scores[task]), 6),
        )
        for task in settings.heldout_tasks
        if task in best_scores
    ]
    # The Hub's model tree: the models the seeds came from (a merge made in the run is not
    # on the Hub; the models it merged are seeds too).
    names = [s.name for s in seeds if s.recipe is None]
    data = ModelCardData(
        library_name="transformers",
        base_model=names if len(names) > 1 else names[0],
        base_model_relation="merge",
        tags=CARD_TAGS,
        model_name=model_name,
        eval_results=results or None,
    )
    seed_list = "\n".join(
        f"- `{s.name}`" + (" (merged by mergekit from the config)" if s.recipe else "")
        for s in seeds
    )
    cols = [*settings.heldout_tasks, "mean"]
    rows = "\n".join(
        f"| {who} | " + " | ".join(f"{v[t]:.4f}" for t in cols) + " |"
        for who, v in heldout.items()
    )
    table = (
        "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n" + rows
        if heldout
        else "No held-out documents were configured."
    )
    merges = [node for _, node in sorted(tree.items()) if node.parents is not None]
    if merges:
        lines = "\n".join(
            f"| {n.number} | {_parent(tree, n.parents[0])} | {_parent(tree, n.parents[1])} | "
            f"{n.mix_ratio:.4f} | {family_tree.split_text(n.split_point, 4)} | "
            f"{_score(n.value)} |"
            for n in merges
            if n.parents is not None
        )
        lineage = (
            "Every merge from the seeds to this model, oldest first (`mix_ratio` is the weight "
            "on parent B before the split point, `1 - mix_ratio` after it; a parent is a "
            "trial number, or a seed model as the mergekit config names it):\n\n"
            "| trial | parent A (base) | parent B | mix_ratio | split_point | mean fitness |\n"
            f"|---|---|---|---|---|---|\n{lines}\n\n![family tree](lineage.png)"
        )
    else:
        lineage = "This model is a seed: no child beat it."
    fitness_docs = doc_counts(settings.fitness_counts, settings.n_fitness_docs)
    heldout_docs = doc_counts(settings.heldout_counts, n_docs)
    body = f"""
# M2N2 merge (trial {best} of study `{settings.study_name}`)

Evolved with M2N2 (Model Merging of Natural Niches): split-point SLERP merges of an archive of
{settings.archive_size} models under resource competition, scored per document with
lm-eval ({", ".join(settings.tasks)}, metric `{settings.metric}`).
Fitness weights: {settings.fitness_weights or "every fitness document weighs the same"}.

## Seeds
{seed_list}

## Lineage
{len(merges)} `m2n2` merge(s) from the seeds; `lineage.yml` rebuilds this model with
`mergekit-multi lineage.yml --intermediate-dir work --out-path rebuilt`.

{lineage}

## Scores
Mean fitness score: {fitness:.4f} over the fitness documents ({fitness_docs}).

Held-out documents, never used for selection ({heldout_docs}):

{table}
{"".join(f"{chr(10)}**Warning:** {w}{chr(10)}" for w in settings.warnings)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _parent(tree: Mapping[int, family_tree.Node], number: int) -> str:
    """A lineage table's parent: a seed by its model's name (trial numbers 0, 1, ... said
    nothing about which model), a child by its trial number."""
    node = tree.get(number)
    if node is None or node.parents is not None or node.seed_name is None:
        return str(number)
    return f"`{node.seed_name}` (seed, trial {number})"


def _score(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def read_history(out: Path) -> list[dict[str, Any]]:
    """The per-trial rows of ``history.jsonl`` in trial order (a resumed run may repeat a
    trial's line: the last one wins)."""
    hist_path = out / "history.jsonl"
    rows = (
        [json.loads(line) for line in hist_path.read_text().splitlines() if line.strip()]
        if hist_path.is_file()
        else []
    )
    last: dict[int, dict[str, Any]] = {}
    for r in rows:
        last[r["trial"]] = r
    return [last[k] for k in sorted(last)]


def write_outputs(
    out: Path,
    archive: Any,
    trials: Mapping[int, Any],
    seeds: Sequence[Seed],
    settings: Settings,
    *,
    heldout: Callable[[int], dict[str, dict[str, float]]],
    save_model: Callable[[int, Path], None],
) -> dict[str, Any]:
    """Write best model, lineage, model card, plots and summary; returns the summary.

    ``archive``: the sampler's final archive; ``trials``: the study's trials by number.
    ``heldout(best)``: held-out task means per model ("M2N2 best", each seed), ``{}`` without
    held-out documents; ``save_model(best, folder)``: writes the best member as a Hugging Face
    model folder (config, tokenizer, weights).
    """
    summary: dict[str, Any] = {"output_dir": str(out), "archive": archive.members}
    if settings.warnings:
        summary["warnings"] = list(settings.warnings)
    plots.save_plots(
        out, read_history(out), trials, archive, settings.fitness_counts, settings.metric
    )
    if not archive.members:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    means = fitness_means(archive)  # weighted as the archive competed (weights.py)
    best = best_member(archive)
    scores = heldout(best)
    tmp = Path(tempfile.mkdtemp(prefix=".best-tmp-", dir=out))
    try:
        save_model(best, tmp)
        docs = lineage_docs(trials, seeds, settings, best)
        n_merges = write_lineage(docs, settings.study_name, best, tmp / "lineage.yml")
        tree = family_tree.ancestry(trials, best)
        picture = out / "plots" / "lineage.png"
        family_tree.save_png(
            tree,
            best,
            picture,
            f"Family tree of trial {best} (study {settings.study_name!r}): "
            f"{n_merges} merge(s) from {len(seeds)} seed(s)",
        )
        shutil.copyfile(picture, tmp / "lineage.png")
        model_card(settings, seeds, best, float(means.max()), scores, tree).save(tmp / "README.md")
        _replace_dir(tmp, out / "best")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.update(
        {
            "best_trial": best,
            "best_fitness": float(means.max()),
            "coverage": float(archive.scores.max(axis=0).mean()),
            "heldout": scores,
            "n_merges_in_lineage": n_merges,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
