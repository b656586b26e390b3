"""The archive as every output ranks it: each member's weighted mean, the best, the figures.

``best/``, ``summary.json``, ``history.jsonl``, the progress bar, the dashboard and the trackers
all name one best member and log the same three figures; they are computed here, once, from
the sampler's archive (its ``members``, ``scores``, ``coverage`` and ``capacity``: the fitness
documents' weights the members competed under, see :mod:`m2n2_plugin.search.weights`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fitness_means(archive: Any) -> np.ndarray:
    """Each member's mean fitness score, weighted by the study's capacity, so the best model
    is the best by the weights the archive competed under: with equal task weights a task of
    12 documents counts as much as one of 60. Without a capacity: the plain mean, exactly
    ``archive.mean_scores``."""
    if archive.capacity is None:
        return archive.mean_scores
    return archive.scores @ archive.capacity / archive.capacity.sum()


def archive_figures(archive: Any) -> dict[str, float]:
    """The archive after a trial as ``history.jsonl``, the progress bar and the trackers log
    it: best and mean of the members' :func:`fitness_means` (so the last ``archive_best`` is
    ``best/``'s fitness, weighted as the archive competed), and coverage (0 while empty)."""
    means = fitness_means(archive) if len(archive.members) else np.zeros(1)
    return {
        "archive_best": float(means.max()),
        "archive_mean": float(means.mean()),
        "coverage": float(archive.coverage),
    }


def best_member(archive: Any) -> int | None:
    """The member with the highest :func:`fitness_means` (first slot on a tie), None while
    the archive is empty; without a capacity exactly ``archive.best()``. The one pick of
    ``best/``, ``summary.json`` and the study's ``m2n2.best``."""
    if not archive.members:
        return None
    return int(archive.members[int(np.argmax(fitness_means(archive)))])
