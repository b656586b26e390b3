"""lm-eval as the fitness: one score per document, straight from lm-eval's logged samples.

M2N2 needs a score per fitness example (the columns of its archive matrix), not a task's mean.
lm-eval already computes that: with ``log_samples=True`` every (document, filter) row carries its
metric. We load the tasks once (:class:`lm_eval.tasks.TaskManager`), keep the task objects, and
call :func:`lm_eval.evaluator.evaluate` on the resident in-memory model for each child, asking
only for the chosen documents (``samples={task: ids}``). Loading the tasks once avoids
re-reading the datasets on every trial.

The score vector is the concatenation, in the order of ``tasks``, of each task's documents in
the order of their ids. A task group (or a tag) in ``tasks`` stands for its subtasks: each
subtask's documents are scored on their own, subtasks in the order the group's YAML lists them
(depth first through nested groups), where the group's name stands in ``tasks``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.search.documents import DocSet
from m2n2_plugin.search.documents import resolve_doc_ids

if TYPE_CHECKING:
    from m2n2_plugin.search.config import EvolveConfig


def _silent_tqdm(*args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def _quiet_lm_eval() -> None:
    """Silence lm-eval's per-call logging and progress bars.

    lm-eval logs at INFO and draws progress bars for every request batch; one evaluation per
    trial would drown the evolve progress bar. Its modules import ``tqdm`` by name, so we point
    those names at a disabled bar (lm-eval offers no switch for this through ``evaluate``).
    """
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    lm_eval.api.model.tqdm = _silent_tqdm  # type: ignore[attr-defined]
    lm_eval.api.task.tqdm = _silent_tqdm  # type: ignore[attr-defined]
    lm_eval.models.huggingface.tqdm = _silent_tqdm  # type: ignore[attr-defined]
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


#: ``HFLM`` options that act on an in-memory model (``fitness.model_args``).
MODEL_ARGS = (
    "add_bos_token",
    "chat_template_args",
    "enable_thinking",
    "logits_cache",
    "max_batch_size",
    "max_length",
    "mixed_precision_dtype",
    "prefix_token_id",
    "softmax_dtype",
    "think_end_token",
    "truncation",
)
#: ``HFLM`` options m2n2 refuses, and why: the model is built by m2n2, not loaded by lm-eval.
_REFUSED_MODEL_ARGS = {
    "pretrained": "the model is the merged child",
    "tokenizer": "the tokenizer is the seeds' (or the mergekit config's tokenizer_source)",
    "dtype": "set fitness.dtype",
    "device": "set fitness.device (or m2n2 evolve --device)",
    "batch_size": "set fitness.batch_size",
}
_LOADING_ONLY = (
    "autogptq backend delta gguf_file gptqmodel max_cpu_memory max_memory_per_gpu "
    "offload_folder parallelize peft revision subfolder tp_plan trust_remote_code "
    "use_fast_tokenizer"
).split()


def parse_args_string(value: Mapping[str, Any] | str | None, what: str) -> dict[str, Any]:
    """lm-eval's ``key=value,key=value`` string (as on its command line) or a mapping.

    The string is parsed by lm-eval's own parser, so values get lm-eval's types (``True``,
    numbers). An empty string or None gives ``{}``.
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    from lm_eval.utils import simple_parse_args_string

    try:
        return dict(simple_parse_args_string(value))
    except Exception as exc:  # lm-eval raises ValueError / IndexError on a bad pair
        raise M2N2Error(f"{what}: cannot parse {value!r} as key=value,... ({exc})") from exc


def hflm_model_args(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``fitness.model_args`` checked: only ``HFLM`` options that act on an in-memory model.

    Others are refused by name with the reason (a loading option would be ignored by ``HFLM``
    for a model object, silently changing nothing the user asked for).
    """
    args = parse_args_string(value, "fitness.model_args")
    for key in args:
        if key in MODEL_ARGS:
            continue
        if key in _REFUSED_MODEL_ARGS:
            why = _REFUSED_MODEL_ARGS[key]
        elif key in _LOADING_ONLY:
            why = "it applies when lm-eval loads a model; m2n2 evaluates its own in-memory model"
        else:
            why = "not an lm-eval HFLM option for an in-memory model"
        raise M2N2Error(
            f"fitness.model_args: {key!r} cannot be used ({why}; "
            f"accepted: {', '.join(MODEL_ARGS)})"
        )
    return args


def _leaf_tasks(loaded: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The leaf tasks behind ``names`` (tasks, groups, tags), in the documented order."""
    tasks, group_map = loaded["tasks"], loaded["group_map"]
    out: list[str] = []

    def add(name: str) -> None:
        if name in tasks:
            out.append(name)
        elif name in group_map:
            for child in group_map[name]:
                add(child)

    for name in names:
        before = len(out)
        add(name)
        if len(out) == before:  # a tag: lm-eval loads its tasks by name, in its order
            out.extend(t for t in tasks if t not in out and name in _tags(tasks[t]))
    return list(dict.fromkeys(out))


def _tags(task: Any) -> list[str]:
    tag = getattr(task.config, "tag", None) or []
    return [tag] if isinstance(tag, str) else list(tag)


#: Benchmarks whose scores people quote: fitness documents from their test split make later
#: scores on them optimistic (the selection saw those documents).
WELL_KNOWN_BENCHMARKS = (
    "gsm8k arc hellaswag mmlu winogrande truthfulqa humaneval mbpp piqa boolq bbh gpqa "
    "ifeval drop triviaqa race openbookqa commonsense_qa math"
).split()


def benchmark_warning(tasks: Mapping[str, Any]) -> str | None:
    """One line naming the ``tasks`` (name -> lm-eval task) that score a well-known
    benchmark's test split, or None. Matched on the task name and its ``dataset_path``."""
    import re

    hits = []
    for name, task in tasks.items():
        split = getattr(task.config, "test_split", None)
        text = f"{name} {getattr(task.config, 'dataset_path', '') or ''}".lower()
        words = set(re.split(r"[^a-z0-9]+", text))
        known = [b for b in WELL_KNOWN_BENCHMARKS if b in words or text.startswith(b)]
        if known and split and "test" in str(split).lower():
            hits.append(f"{name} ({known[0]}, split {split!r})")
    if not hits:
        return None
    return (
        f"the fitness documents come from a well-known benchmark's test split: "
        f"{', '.join(hits)}; scores of this model on that benchmark are no longer clean "
        "(it was selected on them)"
    )


class LmEvalFitness:
    """Per-document scores of an in-memory model on lm-eval tasks.

    Args:
        tasks: lm-eval task names (built-in, or defined in ``include_path``).
        metric: the per-document metric, e.g. ``exact_match`` or ``acc``.
        filter: the filter whose output is scored (``strict-match``, ``none``, ...); None picks
            the task's only filter and fails if there are several.
        include_path: a folder of task YAMLs, or a list of folders. With it, lm-eval's built-in
            tasks are not indexed unless ``include_defaults`` (indexing them costs 10-20 s).
        options: lm-eval evaluation options passed through (``num_fewshot``, ``gen_kwargs`` as
            a mapping or lm-eval's ``key=value,...`` string, ``apply_chat_template``,
            ``system_instruction``, ``fewshot_as_multiturn``, ``confirm_run_unsafe_code``: lets
            tasks that execute the model's code, such as humaneval or mbpp, run it).

    ``tasks`` (the attribute) lists the leaf tasks actually scored: a group named in ``tasks``
    is replaced by its subtasks (see the module's docstring for the order).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        metric: str,
        filter: str | None = None,
        include_path: str | Sequence[str] | None = None,
        include_defaults: bool | None = None,
        num_fewshot: int | None = None,
        gen_kwargs: Mapping[str, Any] | str | None = None,
        apply_chat_template: bool | str = False,
        system_instruction: str | None = None,
        fewshot_as_multiturn: bool = False,
        fewshot_seed: int = 1234,
        confirm_run_unsafe_code: bool = False,
    ) -> None:
        _quiet_lm_eval()
        from lm_eval.tasks import TaskManager

        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        if include_defaults is None:
            include_defaults = not paths
        for path in paths:
            if not os.path.isdir(path):
                raise M2N2Error(f"fitness.include_path {path!r} is not a folder")
        gen_kwargs = parse_args_string(gen_kwargs, "fitness.gen_kwargs")
        manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
        known = set(manager.all_tasks)
        for name in tasks:
            if name not in known:
                hint = "" if include_defaults else " (built-in tasks are not indexed: "
                hint += "" if include_defaults else "set fitness.include_defaults: true)"
                raise M2N2Error(f"unknown lm-eval task {name!r}{hint}")
        try:
            self._loaded = manager.load(list(tasks))
        except Exception as exc:  # lm-eval raises many kinds; the user needs the message
            raise M2N2Error(f"could not load lm-eval task(s) {list(tasks)}: {exc}") from exc
        self.tasks = _leaf_tasks(self._loaded, tasks)
        self.metric = metric
        self.options = {
            "apply_chat_template": apply_chat_template,
            "system_instruction": system_instruction,
            "fewshot_as_multiturn": fewshot_as_multiturn,
            "confirm_run_unsafe_code": confirm_run_unsafe_code,
        }
        self.sizes: dict[str, int] = {}
        self.filters: dict[str, str] = {}
        for name in self.tasks:
            task = self._loaded["tasks"][name]
            if getattr(task, "UNSAFE_CODE", False) and not confirm_run_unsafe_code:
                raise M2N2Error(
                    f"task {name!r} executes code the model writes (unsafe_code in its YAML); "
                    "set fitness.confirm_run_unsafe_code: true to allow it"
                )
            metrics = [m["metric"] for m in (task.config.metric_list or [])]
            if not metrics:
                metrics = list(task._metric_fn_list)
            if metric not in metrics:
                raise M2N2Error(
                    f"task {name!r} has no per-document metric {metric!r} (it has {metrics})"
                )
            # A metric lm-eval does not average (bleu, f1, mcc, perplexity) is a corpus score:
            # its per-document values are not scores of their own, and M2N2 needs those.
            agg = task.aggregation().get(metric)
            agg_name = getattr(agg, "__name__", str(agg))
            if agg is not None and agg_name != "mean":
                raise M2N2Error(
                    f"task {name!r} has no per-document metric {metric!r}: lm-eval aggregates "
                    f"it over all documents ({agg_name}); pick one it averages (acc, "
                    "exact_match, ...)"
                )
            filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
            chosen = filter if filter is not None else filters[0]
            if filter is None and len(filters) > 1:
                raise M2N2Error(f"task {name!r} has filters {filters}: set fitness.filter")
            if chosen not in filters:
                raise M2N2Error(f"task {name!r} has no filter {chosen!r} (it has {filters})")
            self.filters[name] = chosen
            if task.get_config("output_type") == "generate_until" and gen_kwargs:
                task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=fewshot_seed)
            self.sizes[name] = len(list(task.eval_docs))

    def subtasks(self, name: str) -> list[str]:
        """The tasks lm-eval scores for ``name`` (itself, or a group's or tag's subtasks)."""
        return _leaf_tasks(self._loaded, [name])

    def task(self, name: str) -> Any:
        """lm-eval's task object of one (leaf) task."""
        return self._loaded["tasks"][name]

    def generation_settings(self) -> dict[str, Any]:
        """The effective generation settings per task (logged with the study)."""
        out = {}
        for name in self.tasks:
            task = self._loaded["tasks"][name]
            out[name] = {
                "output_type": task.get_config("output_type"),
                "generation_kwargs": task.get_config("generation_kwargs"),
                "num_fewshot": task.get_config("num_fewshot"),
                "filter": self.filters[name],
                "metric": self.metric,
            }
        return out

    def score(
        self, lm: Any, docs: DocSet, samples_log: os.PathLike[str] | str | None = None
    ) -> np.ndarray:
        """Evaluate ``lm`` on ``docs`` and return one score in [0, 1] per document.

        ``samples_log``: also write lm-eval's own per-sample records of the scored filter (the
        document, the prompt, the model's raw and filtered answer, the target, the metric) to
        this JSONL file, one line per document in score-vector order, so the generations behind
        a number can be read.
        """
        from lm_eval.evaluator import evaluate

        wanted = {task: ids for task, ids in docs.ids.items() if ids}
        sub = {
            "tasks": {t: self._loaded["tasks"][t] for t in wanted},
            "groups": {},
            "group_map": {},
        }
        res = evaluate(
            lm,
            sub,
            samples=wanted,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
            **self.options,
        )
        out: list[float] = []
        rows: list[dict[str, Any]] = []
        for task, ids in wanted.items():
            by_id: dict[int, float] = {}
            row_of: dict[int, dict[str, Any]] = {}
            for row in res["samples"][task]:
                if row["filter"] == self.filters[task]:
                    by_id[int(row["doc_id"])] = float(row[self.metric])
                    row_of[int(row["doc_id"])] = row
            rows.extend({"task": task, **row_of[i]} for i in ids if i in row_of)
            for i in ids:
                if i not in by_id:
                    raise M2N2Error(f"lm-eval returned no {self.metric} for {task} document {i}")
                value = by_id[i]
                if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                    raise M2N2Error(
                        f"{task} document {i} scored {value!r}: per-document scores must lie "
                        f"in [0, 1] (pick a metric such as exact_match or acc)"
                    )
                out.append(value)
        if samples_log is not None:
            write_samples(rows, samples_log)
        return np.asarray(out, dtype=np.float64)


def write_samples(rows: Sequence[Mapping[str, Any]], path: os.PathLike[str] | str) -> None:
    """lm-eval's per-sample records as JSONL (lm-eval's own serialiser), written atomically."""
    import json

    from lm_eval.utils import handle_non_serializable

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_fitness(cfg: EvolveConfig) -> tuple[LmEvalFitness, DocSet, DocSet]:
    """The config's lm-eval tasks (loaded once), fitness documents and held-out documents.

    ``int`` held-out specs start after the fitness documents of each task; a held-out
    document that is also a fitness document is an error.
    """
    fc = cfg.fitness
    paths = [fc.include_path] if isinstance(fc.include_path, str) else fc.include_path or []
    fitness = LmEvalFitness(
        fc.tasks,
        metric=fc.metric,
        filter=fc.filter,
        include_path=[str(cfg.resolve(p)) for p in paths] or None,
        include_defaults=fc.include_defaults,
        num_fewshot=fc.num_fewshot,
        gen_kwargs=fc.gen_kwargs,
        apply_chat_template=fc.apply_chat_template,
        system_instruction=fc.system_instruction,
        fewshot_as_multiturn=fc.fewshot_as_multiturn,
        confirm_run_unsafe_code=fc.confirm_run_unsafe_code,
    )
    # Groups in fc.tasks stand for their subtasks: documents are chosen per subtask.
    fit_ids = resolve_doc_ids(fc.fitness_docs, fitness.tasks, fitness.sizes, "fitness")
    if not fit_ids:
        raise M2N2Error("the fitness set is empty")
    ends = {t: (max(ids) + 1 if ids else 0) for t, ids in fit_ids.items()}
    held_ids = resolve_doc_ids(
        fc.heldout_docs, fitness.tasks, fitness.sizes, "heldout", start=ends
    )
    for task, ids in held_ids.items():
        overlap = set(ids) & set(fit_ids.get(task, []))
        if overlap:
            raise M2N2Error(
                f"held-out document {min(overlap)} of task {task!r} is also a fitness document"
            )
    return fitness, DocSet(fit_ids), DocSet(held_ids)
