"""The M2N2 archive as a report (:class:`Archive`) and the rules it shares with the sampler's
fold: which slot a trial takes, and what a valid score vector and capacity are."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from .niches import can_enter
from .niches import replace_index
from .niches import shared_fitness


if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from numpy.typing import NDArray


@dataclasses.dataclass(frozen=True, eq=False)
class Archive:
    """The M2N2 archive as of the fold position, for reports.

    Attributes:
        members: trial numbers of the archive members in slot order, empty slots left out.
        scores: ``len(members) x N`` score matrix, rows in ``members`` order (read-only).
        slots: length ``archive_size``; the member's trial number per slot, None when empty.
        n_folded: COMPLETE trials with scores folded so far (each once, kept or not).
        position: the fold covers every trial numbered below this.
        alpha: the study's sharing exponent.
        capacity: the study's per-example capacity ``c_j`` (read-only), None when every
            ``c_j`` is 1. It weighs shared fitness, replacement and early rejection;
            ``mean_scores``, ``coverage`` and ``best`` are plain, unweighted means.
    """

    members: list[int]
    scores: NDArray[np.float64]
    slots: list[int | None]
    n_folded: int
    position: int
    alpha: float = 1.0
    capacity: NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def slot_scores(self) -> NDArray[np.float64]:
        """``archive_size x N`` scores in slot order, empty slots as zero rows (what the
        replacement rule and parent selection see)."""
        matrix = np.zeros((len(self.slots), self.scores.shape[1]))
        filled = [slot for slot, number in enumerate(self.slots) if number is not None]
        matrix[filled] = self.scores
        return matrix

    def entry_slot(self, child_scores: ArrayLike, *, seed: bool = False) -> int | None:
        """The slot a trial with these scores would take if it were folded next, or None.

        A seed takes the first empty slot if there is one; everything else competes
        (:func:`.niches.replace_index`). With one worker this is what happens to the running
        trial (e.g. to keep a child's weights only if it enters); with several, trials that
        finish first may change the archive before it is folded.
        """
        filled = np.array([number is not None for number in self.slots])
        return entry_slot(self.slot_scores, filled, child_scores, seed, self.alpha, self.capacity)

    def can_enter(self, child_scores: ArrayLike, evaluated: ArrayLike) -> bool:
        """Whether a child scored on the ``evaluated`` examples so far (a boolean mask) can
        still enter the archive if it is folded next: :func:`.niches.can_enter` with this
        archive's slots and alpha. False is a proof that it cannot, whatever its other scores,
        so its evaluation can stop (raise ``optuna.TrialPruned``: the fold skips the trial,
        exactly as it would have dropped the child).

        A seed that finds the archive full competes like a child, so the same test applies
        to it (with an empty slot it is always True); a pruned seed trial counts as rejected
        and its seed is not issued again. Like :meth:`entry_slot` this is exact with one
        worker; with several, trials that finish first may change the archive before this one
        is folded. True while the archive has no member (the child would take an empty
        slot).
        """
        if not self.members:
            return True
        return can_enter(self.slot_scores, child_scores, evaluated, self.alpha, self.capacity)

    def fitness(self, alpha: float | None = None) -> NDArray[np.float64]:
        """Shared fitness of each member, the load ``z`` summed over the members (default
        alpha: the study's; the study's capacity)."""
        if not self.members:
            return np.zeros(0)
        return shared_fitness(self.scores, self.alpha if alpha is None else alpha, self.capacity)

    @property
    def mean_scores(self) -> NDArray[np.float64]:
        """Each member's mean score over the examples (its plain accuracy for 0/1 scores)."""
        return self.scores.mean(axis=1) if self.members else np.zeros(0)

    @property
    def coverage(self) -> float:
        """Best score on each example over all members, averaged over the examples.

        For 0/1 scores: the share of examples that at least one member solves -- what a
        perfect router over the archive would score, an upper bound for any single member.
        """
        return float(self.scores.max(axis=0).mean()) if self.members else 0.0

    def best(self) -> int | None:
        """Trial number of the member with the highest mean score (first slot on a tie)."""
        if not self.members:
            return None
        return self.members[int(np.argmax(self.mean_scores))]


def validate_scores(scores: ArrayLike) -> NDArray[np.float64]:
    try:
        vector = np.array(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scores must be numbers: {error}") from None
    if vector.ndim != 1:
        raise ValueError(f"scores must be 1-D (one value per example), got shape {vector.shape}")
    if vector.size == 0:
        raise ValueError("scores must hold at least one example, got an empty vector")
    if np.all((vector >= 0.0) & (vector <= 1.0)):  # NaN fails both comparisons
        return vector
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise ValueError(f"scores must be finite, got {vector[bad[0]]} at index {bad[0]}")
    bad = np.flatnonzero((vector < 0.0) | (vector > 1.0))
    if bad.size:
        raise ValueError(f"scores must lie in [0, 1], got {vector[bad[0]]} at index {bad[0]}")
    return vector


def entry_slot(
    matrix: NDArray[np.float64],
    filled: NDArray[np.bool_],
    scores: ArrayLike,
    seed: bool,
    alpha: float,
    capacity: NDArray[np.float64] | None,
) -> int | None:
    """The slot a folded trial takes, or None: a seed takes the first empty slot without
    competing; a child, or a seed when the archive is full, competes by :func:`replace_index`.
    """
    if seed:
        empty = np.flatnonzero(~filled)
        if empty.size:
            return int(empty[0])
    return replace_index(matrix, scores, alpha, capacity)


def validate_capacity(capacity: ArrayLike | None) -> NDArray[np.float64] | None:
    """The capacity as a read-only float64 vector, or None for all ones (given or implied)."""
    if capacity is None:
        return None
    try:
        vector = np.array(capacity, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"capacity must be numbers: {error}") from None
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(
            "capacity must be a non-empty 1-D vector, one weight per fitness example; got "
            f"shape {vector.shape}"
        )
    bad = np.flatnonzero(~(np.isfinite(vector) & (vector > 0.0)))
    if bad.size:
        raise ValueError(
            f"capacity must be finite and > 0, got {vector[bad[0]]} at index {bad[0]}"
        )
    if np.all(vector == 1.0):
        return None  # the default: a study with all-ones capacity is a study without one
    vector.setflags(write=False)
    return vector


def describe_capacity(capacity: NDArray[np.float64] | None) -> str:
    if capacity is None:
        return "None (1 for every example)"
    return f"{capacity.size} weights from {capacity.min():g} to {capacity.max():g}"
