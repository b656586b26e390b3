"""The arithmetic of M2N2's archive: resource competition and attraction, as pure functions.

Every function takes score matrices (numpy in) and returns numbers or arrays (numpy out); none
touches Optuna. The sampler in :mod:`.m2n2` is these functions plus bookkeeping in storage.

Notation (the paper's and the official code's): ``S`` is a ``P x N`` matrix, ``S[i, j]`` in
[0, 1] is how well model ``i`` does on fitness example ``j``. Each example is a resource with
capacity ``c_j`` (1 by default). Its load is ``z_j = sum_k S[k, j]`` over the models being
compared; a load of 0 counts as 1 (the official code's rule; the paper writes ``z_j + eps``).

* shared fitness  ``f_i = sum_j c_j S[i, j] / z_j ** alpha``  -- an example solved by few models
  is worth more to each of them (``alpha = 0`` is a plain GA by raw score);
* attraction      ``g(A, k) = sum_j c_j max(0, S[k, j] - S[A, j]) / z_j ** alpha``  -- how much
  ``k`` solves of what ``A`` fails, weighted by scarcity;
* replacement: the child joins the archive as row ``P``; the row with the least shared fitness
  (``z`` including the child) is dropped, the first one on a tie, so an archive member tied with
  the child goes and the child stays;
* early rejection: :func:`can_enter` tells from part of a child's scores whether any scores on
  the other examples could still let it in (for ``0 <= alpha <= 1``: exactly when its best
  case, every other example solved, would enter), so a child that cannot need not be finished.

Empty archive slots are rows of zeros: their shared fitness and attraction are 0, so they are
never drawn as parents and are the first rows replacement drops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from numpy.typing import NDArray

#: Shared fitness values within this fraction of the largest ``|f|`` of the minimum count as
#: tied. Summing the same terms in another order moves a float sum by a few ulps; without a
#: tolerance such noise, not the first-index rule, would decide which of two equally fit rows
#: is dropped. 1e-12 is far above the rounding of a sum and far below real differences.
TIE_RTOL = 1e-12


def _matrix(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (models x examples) array, got {matrix.shape}")
    return matrix


def _capacity(capacity: ArrayLike | None, n_examples: int) -> NDArray[np.float64]:
    if capacity is None:
        return np.ones(n_examples)
    c = np.asarray(capacity, dtype=np.float64)
    if c.shape != (n_examples,):
        raise ValueError(f"capacity must have shape ({n_examples},), got {c.shape}")
    return c


def example_weights(
    scores: ArrayLike, alpha: float = 1.0, capacity: ArrayLike | None = None
) -> NDArray[np.float64]:
    """``c_j / z_j ** alpha`` per example: what solving example ``j`` is worth to one model.

    ``z_j`` sums the column over all rows of ``scores``; a column that nobody solves has
    ``z_j = 0``, taken as 1.
    """
    matrix = _matrix(scores)
    return _weights(matrix.sum(axis=0), alpha, _capacity(capacity, matrix.shape[1]))


def _weights(
    load: NDArray[np.float64], alpha: float, capacity: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``c_j / z_j ** alpha`` from the load ``z`` (changed in place: a 0 becomes 1)."""
    load[load == 0.0] = 1.0
    weights: NDArray[np.float64] = capacity / load**alpha
    return weights


def _weights_with_child(
    archive: NDArray[np.float64],
    child: NDArray[np.float64],
    alpha: float,
    capacity: NDArray[np.float64],
) -> NDArray[np.float64]:
    """:func:`example_weights` of the archive rows plus the child as the last row, without
    copying the archive (numpy sums the rows of an axis-0 sum one after another, so this is the
    same sum in the same order as ``np.vstack([archive, child]).sum(axis=0)``)."""
    return _weights(archive.sum(axis=0) + child, alpha, capacity)


def _fitness(matrix: NDArray[np.float64], weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """Shared fitness of each row given the example weights."""
    fitness: NDArray[np.float64] = (matrix * weights).sum(axis=1)
    return fitness


def shared_fitness(
    scores: ArrayLike, alpha: float = 1.0, capacity: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Shared fitness ``f_i = sum_j c_j S[i, j] / z_j ** alpha`` of every row of ``scores``.

    Args:
        scores: ``P x N`` matrix, one row per model (empty archive slots: rows of zeros).
        alpha: how strongly sharing discounts a crowded example (1: M2N2; 0: raw score sum).
        capacity: ``c_j`` per example; None means 1 for every example.

    Returns:
        ``f``, shape ``(P,)``.
    """
    matrix = _matrix(scores)
    return _fitness(matrix, example_weights(matrix, alpha, capacity))


def attraction(
    scores: ArrayLike,
    parent_index: int,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Attraction ``g(A, k) = sum_j c_j max(0, S[k, j] - S[A, j]) / z_j ** alpha`` per row ``k``.

    ``A = parent_index``; ``g(A, A) = 0``. Parent B is drawn with ``p(B = k)`` proportional to
    this: a partner that is strong exactly where ``A`` is weak.

    Returns:
        ``g``, shape ``(P,)``.
    """
    matrix = _matrix(scores)
    return _attraction(matrix, parent_index, example_weights(matrix, alpha, capacity))


def _attraction(
    matrix: NDArray[np.float64], parent_index: int, weights: NDArray[np.float64]
) -> NDArray[np.float64]:
    """:func:`attraction` given the example weights."""
    if not 0 <= parent_index < matrix.shape[0]:
        raise ValueError(f"parent_index {parent_index} is not a row of a {matrix.shape} matrix")
    gain = np.subtract(matrix, matrix[parent_index])
    np.maximum(gain, 0.0, out=gain)
    gain *= weights
    pull: NDArray[np.float64] = gain.sum(axis=1)
    return pull


def first_argmin(values: ArrayLike) -> int:
    """Index of the smallest value, the first one among ties (within :data:`TIE_RTOL`)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    tolerance = TIE_RTOL * max(float(np.abs(v).max()), np.finfo(np.float64).tiny)
    return int(np.flatnonzero(v <= v.min() + tolerance)[0])


def replace_index(
    archive_scores: ArrayLike,
    child_scores: ArrayLike,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
) -> int | None:
    """The archive slot a child takes under resource competition, or None if the child loses.

    Shared fitness is computed over the ``P`` archive rows plus the child as row ``P`` (the
    child counts in every ``z_j``). The row with the least fitness is dropped, the first on a
    tie: an empty slot (a zero row) goes before any member that solves something, and a member
    tied with the child goes before the child.

    Args:
        archive_scores: ``P x N``, empty slots as zero rows.
        child_scores: ``(N,)``.
        alpha, capacity: as in :func:`shared_fitness`.

    Returns:
        The slot index in ``[0, P)`` the child replaces, or None when the child is dropped.
    """
    archive = _matrix(archive_scores, "archive_scores")
    child = np.asarray(child_scores, dtype=np.float64)
    if child.shape != (archive.shape[1],):
        raise ValueError(f"child_scores must have shape ({archive.shape[1]},), got {child.shape}")
    weights = _weights_with_child(archive, child, alpha, _capacity(capacity, archive.shape[1]))
    fitness = np.append(_fitness(archive, weights), (child * weights).sum())
    loser = first_argmin(fitness)
    return None if loser == archive.shape[0] else loser


def can_enter(
    archive_scores: ArrayLike,
    child_scores: ArrayLike,
    evaluated: ArrayLike,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
) -> bool:
    """Whether a partly evaluated child can still enter the archive (exact early rejection).

    In steady-state M2N2 a child that :func:`replace_index` drops changes nothing, so once it is
    certain to be dropped the rest of its evaluation is wasted. This answers, after some of the
    ``N`` examples are scored: is there any way of scoring the others that lets the child in?

    Args:
        archive_scores: ``P x N`` slot matrix in ``[0, 1]``, empty slots as zero rows (what
            :attr:`.m2n2.Archive.slot_scores` gives).
        child_scores: ``(N,)``; only the entries where ``evaluated`` is True are read (the
            others may hold anything, NaN included). Those must lie in ``[0, 1]``.
        evaluated: boolean mask of shape ``(N,)``, True for the examples scored so far. Index
            arrays are refused, since ``[0, 1]`` as indices and as a mask mean different
            things; build a mask with ``mask = np.zeros(N, bool); mask[idx] = True``.
        alpha, capacity: as in :func:`shared_fitness`.

    Returns:
        False only when it is proven that :func:`replace_index` returns None (child dropped)
        for every completion of the unevaluated scores with values in ``[0, 1]``; True
        otherwise. With every example evaluated it is exactly
        ``replace_index(archive_scores, child_scores, alpha, capacity) is not None``.

    Raises:
        ValueError: shapes disagree, or a score (archive, or child where evaluated) is not a
            finite number in ``[0, 1]``.
        TypeError: ``evaluated`` is not a boolean array.

    Why it is exact, for ``0 <= alpha <= 1`` and ``c_j >= 0``. Fix the evaluated scores; let
    ``x`` be any completion and ``1`` the best case (every unevaluated score 1). For an
    unevaluated example ``j`` let ``r_j = sum_i S[i, j]`` (archive only) and ``s = x_j``, so
    ``z_j = r_j + s``. Other examples do not depend on ``x``.

    1. A member's term ``c_j S[i, j] / z_j ** alpha`` does not rise with ``s``: ``z_j`` rises
       and ``alpha >= 0``; if ``r_j = 0`` then ``S[i, j] = 0`` and the term is 0 throughout
       (also under the rule ``z = 0 -> 1``).
    2. The child's term ``h(s) = c_j s / (s + r) ** alpha`` does not fall with ``s``. For
       ``r > 0``, ``h'(s) = c_j (s + r) ** (-alpha - 1) ((1 - alpha) s + r) >= 0``. For
       ``r = 0``, ``h(0) = 0`` (``z = 0`` taken as 1) and ``h(s) = c_j s ** (1 - alpha)``,
       nondecreasing on ``(0, 1]`` and ``>= 0``.
    3. Going from ``1`` down to ``x``, the child loses ``D = f_c(1) - f_c(x) >= 0`` and no
       member gains more than ``D``. On example ``j`` member ``i`` gains at most
       ``c_j r [(r + s) ** -alpha - (r + 1) ** -alpha]`` (as ``S[i, j] <= r``); the child
       loses ``c_j [(r + 1) ** -alpha - s (r + s) ** -alpha]``, which exceeds that bound by
       ``c_j [(r + 1) ** (1 - alpha) - (r + s) ** (1 - alpha)] >= 0`` as ``alpha <= 1``.

    :func:`replace_index` drops the child iff every member has ``f_i > f_c + t`` with the tie
    margin ``t = TIE_RTOL * max f`` (first-index rule: a member within ``t`` of the child is
    dropped instead). By 1-2, ``f_i(x) - f_c(x) >= f_i(1) - f_c(1) + D``; by 3 the largest
    fitness is at most ``max f(1) + D``, so ``t(x) <= t(1) + TIE_RTOL * D``. Together
    ``f_i(x) - f_c(x) - t(x) >= f_i(1) - f_c(1) - t(1)``: if the child is dropped in the best
    case it is dropped at every ``x``; and if it is not, the best case itself is a completion
    that lets it in. So the test is :func:`replace_index` on the best case, with the same tie
    rule: a best case that ties a member lets the child in (True), and so does an empty slot
    (a zero row's fitness, 0, is never above the child's). In floating point a rejection also
    needs the best-case margin to exceed a bound on the rounding of a fitness sum,
    ``4 (P + N + 9) eps max f``, so that rounding at another completion cannot undo it; that
    only matters within about ``1e-15 (P + N) max f`` of the tie tolerance.

    For ``alpha > 1`` the child's term is not monotone: it peaks at ``s = r / (alpha - 1)``,
    and on an example no member solves it is ``s ** (1 - alpha)``, unbounded as ``s -> 0+``.
    So the test falls back on a sound bound: each member at its least fitness (completion 1),
    the child at the sum of its per-example maxima, the tie margin at the largest fitness any
    completion can reach (members at completion 0). It is True as soon as an unevaluated
    example with ``c_j > 0`` is solved by no member. For ``alpha < 0`` (members then gain from
    the child's scores), a non-finite ``alpha`` or any negative capacity, nothing is proven and
    the answer is True (unless every example is evaluated).
    """
    archive = _matrix(archive_scores, "archive_scores")
    n_rows, n_examples = archive.shape
    if not np.all((archive >= 0.0) & (archive <= 1.0)):  # NaN fails both comparisons
        raise ValueError("archive_scores must be finite numbers in [0, 1]")
    child = np.asarray(child_scores, dtype=np.float64)
    if child.shape != (n_examples,):
        raise ValueError(f"child_scores must have shape ({n_examples},), got {child.shape}")
    mask = np.asarray(evaluated)
    if mask.dtype != np.bool_:
        raise TypeError(
            f"evaluated must be a boolean mask, got dtype {mask.dtype} (for indices idx: "
            "mask = np.zeros(N, bool); mask[idx] = True)"
        )
    if mask.shape != (n_examples,):
        raise ValueError(f"evaluated must have shape ({n_examples},), got {mask.shape}")
    seen = child[mask]
    if not np.all((seen >= 0.0) & (seen <= 1.0)):
        raise ValueError("child_scores must be finite numbers in [0, 1] where evaluated")
    c = _capacity(capacity, n_examples)
    best = np.where(mask, child, 1.0)
    if mask.all():
        return replace_index(archive, best, alpha, c) is not None
    alpha = float(alpha)
    open_ = ~mask
    n_terms = n_rows + 1 + n_examples
    if not (np.isfinite(alpha) and alpha >= 0.0) or np.any(c < 0.0):
        return True
    weights = _weights_with_child(archive, best, alpha, c)
    if alpha <= 1.0:
        members, child_fitness = _fitness(archive, weights), float((best * weights).sum())
        largest = max(child_fitness, float(members.max(initial=0.0)))
        return not _child_dropped(members, child_fitness, largest, n_terms)
    # alpha > 1: bounds, not one completion.
    load = archive[:, open_].sum(axis=0)
    c_open = c[open_]
    if np.any((load == 0.0) & (c_open > 0.0)):
        return True  # the child's term s ** (1 - alpha) is unbounded as s -> 0+
    peak = np.minimum(1.0, load / (alpha - 1.0))  # argmax of s / (s + r) ** alpha on [0, 1]
    child_peaks = c_open * peak / np.where(load > 0.0, peak + load, 1.0) ** alpha
    child_most = float((seen * weights[mask]).sum() + child_peaks.sum())
    members_least = archive @ weights  # every unevaluated child score at 1
    worst = np.where(mask, child, 0.0)
    members_most = _fitness(archive, _weights_with_child(archive, worst, alpha, c))
    largest = max(child_most, float(members_most.max(initial=0.0)))
    return not _child_dropped(members_least, child_most, largest, n_terms)


def _child_dropped(
    members: NDArray[np.float64], child: float, largest: float, n_terms: int
) -> bool:
    """:func:`first_argmin`'s test "every member is above the child by more than the tie
    tolerance", with ``largest`` (the largest fitness, or a bound on it) as the tolerance's
    scale, plus a bound on the rounding of a computed fitness: a sum of ``n_terms`` nonnegative
    products and powers is off by at most about ``n_terms`` ulps of ``largest`` in any summation
    order; four times that covers this evaluation and the one at any other completion."""
    scale = max(largest, np.finfo(np.float64).tiny)
    margin = TIE_RTOL * scale + 4.0 * (n_terms + 8) * float(np.finfo(np.float64).eps) * scale
    return bool(np.all(members > child + margin))


def _filled_mask(filled: ArrayLike | None, n_rows: int) -> NDArray[np.bool_]:
    mask = np.ones(n_rows, dtype=bool) if filled is None else np.asarray(filled, dtype=bool)
    if mask.shape != (n_rows,):
        raise ValueError(f"filled must have shape ({n_rows},), got {mask.shape}")
    if not mask.any():
        raise ValueError("the archive is empty: no parent can be drawn")
    return mask


def _normalise(weights: NDArray[np.float64], fallback: NDArray[np.bool_]) -> NDArray[np.float64]:
    """``weights / sum``; uniform over ``fallback`` when every weight is 0."""
    total = float(weights.sum())
    if total > 0.0:
        return weights / total
    return fallback / float(fallback.sum())


def parent_a_probabilities(
    scores: ArrayLike,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
    filled: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """``p(A = i)`` proportional to shared fitness over the archive (child not there yet).

    ``filled`` marks the slots that hold a model (default: all rows). If every filled member has
    fitness 0 (nobody solves anything) A is uniform over the filled slots.
    """
    matrix = _matrix(scores)
    mask = _filled_mask(filled, matrix.shape[0])
    return _p_a(shared_fitness(matrix, alpha, capacity), mask)


def parent_b_probabilities(
    scores: ArrayLike,
    parent_index: int,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
    filled: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """``p(B = k | A)`` proportional to :func:`attraction`.

    When every attraction is 0 (``A`` is at least as good as everyone on every example) the
    official code divides 0 by 0; here B is drawn proportional to shared fitness over the other
    filled members instead (uniform over them if those are all 0 too), and B = A only when A is
    the archive's only member.
    """
    matrix = _matrix(scores)
    mask = _filled_mask(filled, matrix.shape[0])
    weights = example_weights(matrix, alpha, capacity)
    return _p_b(matrix, parent_index, weights, _fitness(matrix, weights), mask)


def _p_a(fitness: NDArray[np.float64], filled: NDArray[np.bool_]) -> NDArray[np.float64]:
    """:func:`parent_a_probabilities` given the shared fitness."""
    return _normalise(np.where(filled, fitness, 0.0), filled)


def _p_b(
    matrix: NDArray[np.float64],
    parent_index: int,
    weights: NDArray[np.float64],
    fitness: NDArray[np.float64],
    filled: NDArray[np.bool_],
) -> NDArray[np.float64]:
    """:func:`parent_b_probabilities` given the example weights and the shared fitness."""
    pull = np.where(filled, _attraction(matrix, parent_index, weights), 0.0)
    if float(pull.sum()) > 0.0:
        return pull / float(pull.sum())
    others = filled.copy()
    others[parent_index] = False
    if not others.any():
        alone = np.zeros(matrix.shape[0])
        alone[parent_index] = 1.0
        return alone
    return _p_a(fitness, others)


def draw_index(rng: np.random.Generator, probabilities: ArrayLike) -> int:
    """One index drawn with the given probabilities, from exactly one ``rng.random()`` call.

    Inverse-CDF sampling, written out so the stream a seed gives is fixed and an index with
    probability 0 can never come out (not even when rounding puts ``u * total`` at the end).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    cumulative = np.cumsum(p)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(index, int(np.flatnonzero(p > 0.0)[-1]))


def draw_parents(
    scores: ArrayLike,
    rng: np.random.Generator,
    alpha: float = 1.0,
    capacity: ArrayLike | None = None,
    filled: ArrayLike | None = None,
    use_attraction: bool = True,
    *,
    weights: ArrayLike | None = None,
    fitness: ArrayLike | None = None,
) -> tuple[int, int]:
    """Draw the rows of parent A and parent B (two ``rng.random()`` calls, A first).

    With ``use_attraction=False`` (the paper's ablation) A and B are i.i.d. proportional to
    shared fitness, with replacement, so A = B is possible.

    The draws are exactly those of :func:`parent_a_probabilities` and
    :func:`parent_b_probabilities`, with the example weights and the shared fitness computed
    once. A caller that keeps them for an unchanged archive may pass them: ``weights`` must be
    ``example_weights(scores, alpha, capacity)`` and ``fitness`` (only with ``weights``)
    ``shared_fitness(scores, alpha, capacity)``.
    """
    matrix = _matrix(scores)
    mask = _filled_mask(filled, matrix.shape[0])
    if weights is None:
        w = example_weights(matrix, alpha, capacity)
        fitness = None
    else:
        w = np.asarray(weights, dtype=np.float64)
    f = _fitness(matrix, w) if fitness is None else np.asarray(fitness, dtype=np.float64)
    p_a = _p_a(f, mask)
    a = draw_index(rng, p_a)
    if not use_attraction:
        return a, draw_index(rng, p_a)
    return a, draw_index(rng, _p_b(matrix, a, w, f, mask))
