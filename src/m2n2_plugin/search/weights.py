"""How much each fitness document counts: ``fitness.weighting`` and ``fitness.task_weights``.

M2N2's resource competition treats every fitness example as a resource of capacity ``c_j``
(the hub sampler's ``capacity``). With one score per document and every ``c_j = 1``, a task with
500 documents weighs ten times one with 50, whatever the user meant. So by default
(``weighting: per_task``) a task's weight ``w_task`` (1 unless ``task_weights`` says otherwise)
is the total of its documents: ``c_j ∝ w_task / n_docs(task)``, and every task counts the same.
``weighting: per_document`` gives each document its task's weight, ``c_j ∝ w_task`` (with the
default weights: every document the same, the behaviour before these settings existed).

The vector is scaled so that its mean is 1: no decision of the sampler depends on the scale
(shared fitness, replacement and early rejection compare fitness values with a relative
tolerance, parent draws normalise), and a mean of 1 keeps a weighted study's fitness values
comparable with an unweighted one's. When every document gets the same weight -- one task, or
tasks of equal size and weight -- the capacity is None: exactly the unweighted sampler, bit for
bit, so existing single-task runs and studies are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.search.documents import DocSet

#: The study user attr that logs the weights (what ``to_json`` returns).
STUDY_ATTR = "m2n2.fitness_weights"
#: The fingerprint key (evolve's resume check): the per-document weight of each task, or None.
FINGERPRINT_KEY = "task_weights"


@dataclass(frozen=True)
class FitnessWeights:
    """The fitness documents' weights as the sampler gets them, and how they were derived.

    Attributes:
        weighting: ``per_task`` or ``per_document`` (``fitness.weighting``).
        task_weights: every task with fitness documents -> its weight (1 unless given).
        n_docs: every task with fitness documents -> how many it has.
        per_document: every task with fitness documents -> the ``c_j`` of each of its
            documents (mean 1 over all documents).
        capacity: one ``c_j`` per fitness document in score-vector order, or None when every
            document weighs the same (the sampler's default, bit-identical).
    """

    weighting: str
    task_weights: dict[str, float]
    n_docs: dict[str, int]
    per_document: dict[str, float]
    capacity: np.ndarray | None

    @classmethod
    def from_config(
        cls,
        weighting: str,
        task_weights: dict[str, float] | None,
        docs: DocSet,
        fitness: Any = None,
    ) -> FitnessWeights:
        """The weights of ``docs`` (the fitness documents, in score-vector order).

        A task group (or tag) named in ``fitness.tasks`` counts as its subtasks (as lm-eval
        scores it: ``fitness``, the :class:`~m2n2_plugin.fitness.LmEvalFitness`, resolves
        it): a weight given to the group is the weight of each subtask, unless the subtask
        has one of its own.
        """
        given = dict(task_weights or {})
        if fitness is not None:
            for name, weight in list(given.items()):
                for leaf in fitness.subtasks(name):
                    if leaf != name:
                        given.setdefault(leaf, weight)
        weights = {task: float(given.get(task, 1.0)) for task in docs.ids}
        n_docs = {task: len(ids) for task, ids in docs.ids.items()}
        if weighting == "per_task":
            raw = {task: weights[task] / n_docs[task] for task in docs.ids}
        elif weighting == "per_document":
            raw = dict(weights)
        else:  # the config's Literal refuses anything else
            raise M2N2Error(f"fitness.weighting: unknown value {weighting!r}")
        if len(set(raw.values())) <= 1:
            per_document = dict.fromkeys(raw, 1.0)
            return cls(weighting, weights, n_docs, per_document, None)
        # Scale to mean 1 (dividing by the largest first keeps the sum finite).
        top = max(raw.values())
        scaled = {task: value / top for task, value in raw.items()}
        total = sum(scaled[task] * n_docs[task] for task in scaled)
        n = sum(n_docs.values())
        per_document = {task: value * n / total for task, value in scaled.items()}
        capacity = np.concatenate([np.full(n_docs[task], per_document[task]) for task in docs.ids])
        if not np.all(np.isfinite(capacity) & (capacity > 0.0)):
            raise M2N2Error(
                "fitness.task_weights: the weights are too far apart (a document's weight "
                "underflows to 0); keep their ratios within about 1e12"
            )
        return cls(weighting, weights, n_docs, per_document, capacity)

    def fingerprint(self) -> dict[str, float] | None:
        """What the resume check compares: the weight of each task's documents, or None when
        every document weighs the same (as in studies made before these settings existed)."""
        return None if self.capacity is None else dict(self.per_document)

    def to_json(self) -> dict[str, Any]:
        """Logged with the study (``STUDY_ATTR``): the settings and what they gave."""
        return {
            "weighting": self.weighting,
            "task_weights": self.task_weights,
            "n_docs": self.n_docs,
            "document_weight": self.per_document,
            "uniform": self.capacity is None,
        }

    def describe(self) -> str:
        """One line for the model card and the run's settings."""
        if self.capacity is None:
            reason = "one task" if len(self.n_docs) == 1 else f"weighting {self.weighting}"
            return f"every fitness document weighs the same ({reason})"
        cells = ", ".join(
            f"{task} weight {self.task_weights[task]:g} over {self.n_docs[task]} documents "
            f"({self.per_document[task]:.4g} each)"
            for task in self.n_docs
        )
        return f"weighting {self.weighting}: {cells}"


def resume_hint(old: Any, new: dict[str, float] | None) -> str:
    """The end of the one-line refusal when a resumed study's weights differ."""
    if old is None and new is not None:
        return (
            " (this study weighs every fitness document the same, as every study made before "
            "fitness.weighting existed: resume it with fitness.weighting: per_document and no "
            "task_weights)"
        )

    def show(weights: Any) -> str:
        if weights is None:
            return "every document the same"
        return ", ".join(f"{task} {value:.4g}" for task, value in weights.items())

    return f" (document weights per task: the study's: {show(old)}; this config's: {show(new)})"
