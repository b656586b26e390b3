"""Which documents a run scores: the fitness and held-out sets, as explicit ids per task.

A config says ``fitness_docs: 60`` (or a list of ids, or ids per task); the run turns that into
``{task: [doc ids]}`` once, checks every id exists (and that a task has as many documents as
asked), and keeps it as a :class:`DocSet`, whose order is the order of the score vector:
each task's documents, tasks in the config's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m2n2_plugin.errors import M2N2Error


@dataclass(frozen=True)
class DocSet:
    """Which documents of which tasks: ``{task: [doc ids]}``, in a fixed order."""

    ids: dict[str, list[int]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.ids.values())

    def labels(self) -> list[str]:
        """``task:doc_id`` for every position of the score vector."""
        return [f"{task}:{i}" for task, ids in self.ids.items() for i in ids]

    def subset(self, positions: Sequence[int]) -> DocSet:
        """The documents at these positions of the score vector, in score-vector order.

        Scoring the subset returns its scores in the order of ``sorted(positions)``.
        """
        flat = [(task, i) for task, ids in self.ids.items() for i in ids]
        out: dict[str, list[int]] = {}
        for pos in sorted(int(p) for p in positions):
            task, i = flat[pos]
            out.setdefault(task, []).append(i)
        return DocSet(out)

    def task_means(self, scores: np.ndarray) -> dict[str, float]:
        """Mean score per task of a score vector over these documents, and ``"mean"``."""
        out: dict[str, float] = {}
        pos = 0
        for task, ids in self.ids.items():
            out[task] = float(scores[pos : pos + len(ids)].mean())
            pos += len(ids)
        out["mean"] = float(scores.mean())
        return out


def resolve_doc_ids(
    spec: int | Sequence[int] | Mapping[str, Sequence[int]] | None,
    tasks: Sequence[str],
    sizes: Mapping[str, int],
    what: str,
    start: Mapping[str, int] | None = None,
) -> dict[str, list[int]]:
    """Turn a fitness/held-out spec into explicit ids per task, checking they exist.

    ``int n``: n documents per task, starting at ``start[task]`` (0 for the fitness set, the end
    of the fitness set for the held-out set); a list: the same ids for every task; a mapping:
    ids per task. ``None``: no documents.
    """
    if spec is None:
        return {}
    out: dict[str, list[int]] = {}
    for task in tasks:
        if isinstance(spec, Mapping):
            if task not in spec:
                continue
            ids = [int(i) for i in spec[task]]
        elif isinstance(spec, int):
            # Fewer documents than asked for would change the search (and, past the fitness
            # documents, leave no held-out ones) without a word: refuse instead.
            first = (start or {}).get(task, 0)
            if first + spec > sizes[task]:
                after = f" after its {first} fitness documents" if first else ""
                raise M2N2Error(
                    f"{what}_docs: {spec} documents asked of task {task!r}{after}, "
                    f"which has {sizes[task]}"
                )
            ids = list(range(first, first + spec))
        else:
            ids = [int(i) for i in spec]
        bad = [i for i in ids if not 0 <= i < sizes[task]]
        if bad:
            raise M2N2Error(
                f"{what} document id {bad[0]} does not exist in task {task!r} "
                f"({sizes[task]} documents)"
            )
        if len(set(ids)) != len(ids):
            raise M2N2Error(f"{what} documents of task {task!r} list an id twice")
        if ids:
            out[task] = ids
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(tasks))
        if unknown:
            raise M2N2Error(f"{what} names task {unknown[0]!r}, which is not in fitness.tasks")
    return out
