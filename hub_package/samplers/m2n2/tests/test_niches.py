"""The pure functions against matrices worked out by hand."""

from __future__ import annotations

import importlib

from m2n2_toy import assert_frequencies
from m2n2_toy import load_m2n2
import numpy as np
import pytest


m2n2 = load_m2n2()
niches = importlib.import_module(m2n2.__name__ + ".niches")

# Rows: models; columns: examples. Column 3 is solved by nobody (z = 0, taken as 1).
#   z = [2, 2, 1, 0 -> 1]
S = np.array(
    [
        [1.0, 0.0, 1.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
    ]
)


def test_shared_fitness_by_hand() -> None:
    # f0 = 1/2 + 1/1, f1 = 1/2 + 1/2, f2 = 1/2
    np.testing.assert_allclose(m2n2.shared_fitness(S), [1.5, 1.0, 0.5])
    # alpha = 0: the raw score sum (a plain GA)
    np.testing.assert_allclose(m2n2.shared_fitness(S, alpha=0.0), [2.0, 2.0, 1.0])
    # alpha = 2: z^2 = [4, 4, 1, 1]
    np.testing.assert_allclose(m2n2.shared_fitness(S, alpha=2.0), [1.25, 0.5, 0.25])
    # capacities [2, 1, 1, 5]: f0 = 2/2 + 1, f1 = 2/2 + 1/2, f2 = 1/2
    np.testing.assert_allclose(m2n2.shared_fitness(S, capacity=[2, 1, 1, 5]), [2.0, 1.5, 0.5])


def test_shared_fitness_fractional_scores_and_zero_load() -> None:
    # Only an exact z = 0 becomes 1: z = 0.5 divides (doubling), the empty column adds 0.
    scores = np.array([[0.2, 0.0], [0.3, 0.0]])
    np.testing.assert_allclose(m2n2.shared_fitness(scores), [0.4, 0.6])
    # An all-zero matrix (an empty archive) has fitness 0 everywhere, no division by zero.
    np.testing.assert_array_equal(m2n2.shared_fitness(np.zeros((3, 5))), np.zeros(3))


def test_attraction_by_hand() -> None:
    # A = 0: row 1 gains [0, 1, 0, 0] -> 1/2; row 2 gains [0, 1, 0, 0] -> 1/2
    np.testing.assert_allclose(m2n2.attraction(S, 0), [0.0, 0.5, 0.5])
    # A = 2: row 0 gains [1, 0, 1, 0] -> 1/2 + 1; row 1 gains [1, 0, 0, 0] -> 1/2
    np.testing.assert_allclose(m2n2.attraction(S, 2), [1.5, 0.5, 0.0])
    # Fractional: only the positive part of S_k - S_A counts.
    scores = np.array([[0.5, 1.0], [1.0, 0.0]])  # z = [1.5, 1]
    np.testing.assert_allclose(m2n2.attraction(scores, 0), [0.0, 0.5 / 1.5])
    np.testing.assert_allclose(m2n2.attraction(scores, 1), [1.0, 0.0])


def test_attraction_all_zero_when_a_dominates() -> None:
    dominant = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(m2n2.attraction(dominant, 0), [0.0, 0.0, 0.0])
    # Fallback: B by shared fitness over the other members (z = [2, 1]: f1 = 1/2, f2 = 0).
    p_b = m2n2.parent_b_probabilities(dominant, 0)
    np.testing.assert_allclose(p_b, [0.0, 1.0, 0.0])
    # ... uniform over the other members when they all have fitness 0 ...
    lonely = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(m2n2.parent_b_probabilities(lonely, 0), [0.0, 0.5, 0.5])
    # ... never an empty slot, and B = A only for a single member.
    np.testing.assert_allclose(
        m2n2.parent_b_probabilities(lonely, 0, filled=[True, True, False]), [0.0, 1.0, 0.0]
    )
    np.testing.assert_allclose(
        m2n2.parent_b_probabilities(lonely, 0, filled=[True, False, False]), [1.0, 0.0, 0.0]
    )


def test_parent_a_probabilities() -> None:
    np.testing.assert_allclose(m2n2.parent_a_probabilities(S), [0.5, 1.0 / 3.0, 1.0 / 6.0])
    # Nobody solves anything: uniform over the filled slots, never an empty one.
    zeros = np.zeros((4, 3))
    np.testing.assert_allclose(
        m2n2.parent_a_probabilities(zeros, filled=[True, False, True, False]),
        [0.5, 0.0, 0.5, 0.0],
    )
    with pytest.raises(ValueError, match="empty"):
        m2n2.parent_a_probabilities(zeros, filled=[False] * 4)


def test_replace_index_empty_slot_goes_first() -> None:
    # A zero child still fills the empty slot: slot 1 (f = 0) ties the child and comes first.
    assert m2n2.replace_index([[1.0, 0.0], [0.0, 0.0]], [0.0, 0.0]) == 1


def test_replace_index_child_dropped() -> None:
    # f = [1, 1, 0]: the child is the argmin.
    assert m2n2.replace_index([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]) is None


def test_replace_index_member_tied_with_child_is_dropped() -> None:
    # z = [2, 1]: f = [1/2, 1, 1/2]; member 0 ties the child and has the lower index.
    assert m2n2.replace_index([[1.0, 0.0], [0.0, 1.0]], [1.0, 0.0]) == 0


def test_replace_index_new_niche_wins() -> None:
    # z = [2, 1, 1, 1]: f = [1/2 + 1, 1/2, child 2] -> slot 1 goes.
    archive = [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert m2n2.replace_index(archive, [0.0, 0.0, 1.0, 1.0]) == 1


def test_replace_index_counts_the_child_in_z() -> None:
    # With the child in z = [2, 2, 1]: f = [1, 1, child 1] -> the first, slot 0, goes.
    # (Leaving the child out of z would give f = [2, 1] and drop slot 1.)
    archive = [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert m2n2.replace_index(archive, [1.0, 1.0, 0.0]) == 0
    # alpha = 0 compares raw sums [2, 1, 2]: slot 1 goes.
    assert m2n2.replace_index(archive, [1.0, 1.0, 0.0], alpha=0.0) == 1


def test_replace_index_tie_survives_float_rounding() -> None:
    # z = [1, 3, 2, 3, 3, 2]; member 1 has 1/3 + 1/3 + 1/3 + 1/2 = 3/2 and the child
    # 1/3 + 1/2 + 1/3 + 1/3 = 3/2: a tie, so the member goes. Summed in column order the two
    # floats differ in the last bit and a bare np.argmin would drop the child instead.
    archive = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]], dtype=float)
    child = np.array([0, 1, 1, 1, 1, 0], dtype=float)
    fitness = m2n2.shared_fitness(np.vstack([archive, child]))
    assert np.argmin(fitness) == 2  # the float noise this guards against
    assert m2n2.replace_index(archive, child) == 1


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="2-D"):
        m2n2.shared_fitness([1.0, 0.0])
    with pytest.raises(ValueError, match="child_scores"):
        m2n2.replace_index(S, [1.0, 0.0])
    with pytest.raises(ValueError, match="capacity"):
        m2n2.shared_fitness(S, capacity=[1.0])
    with pytest.raises(ValueError, match="parent_index"):
        m2n2.attraction(S, 3)


# Four members and an empty slot (row 4). z = [2, 1, 1, 1]; f = [3/2, 3/2, 1, 0, 0].
ARCHIVE = np.array(
    [
        [1.0, 1.0, 0.0, 0.0],
        [1.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
FILLED = np.array([True, True, True, True, False])
P_A = np.array([0.375, 0.375, 0.25, 0.0, 0.0])
# g(0, .) = [0, 1, 1, 0, 0]; g(1, .) = [1, 0, 1, 0, 0]; g(2, .) = [3/2, 3/2, 0, 0, 0]
P_B_GIVEN_A = np.array(
    [
        [0.0, 0.5, 0.5, 0.0, 0.0],
        [0.5, 0.0, 0.5, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


def test_selection_probabilities_by_hand() -> None:
    np.testing.assert_allclose(m2n2.parent_a_probabilities(ARCHIVE, filled=FILLED), P_A)
    for a in range(3):
        np.testing.assert_allclose(
            m2n2.parent_b_probabilities(ARCHIVE, a, filled=FILLED), P_B_GIVEN_A[a]
        )


def test_draw_parents_frequencies() -> None:
    rng = np.random.default_rng(20250816)
    counts = np.zeros((5, 5))
    for _ in range(20_000):
        a, b = m2n2.draw_parents(ARCHIVE, rng, filled=FILLED)
        counts[a, b] += 1
    assert_frequencies(counts.sum(axis=1), P_A)
    assert_frequencies(counts, P_A[:, None] * P_B_GIVEN_A)


def test_draw_parents_without_attraction_is_iid() -> None:
    rng = np.random.default_rng(7)
    counts = np.zeros((5, 5))
    for _ in range(20_000):
        a, b = m2n2.draw_parents(ARCHIVE, rng, filled=FILLED, use_attraction=False)
        counts[a, b] += 1
    assert_frequencies(counts, np.outer(P_A, P_A))


def test_draw_index_never_picks_zero_probability() -> None:
    class Top:
        def random(self) -> float:
            return float(np.nextafter(1.0, 0.0))

    assert niches.draw_index(Top(), [0.3, 0.7, 0.0, 0.0]) == 1


# ----------------------------------------------------------------- capacity c_j


def test_capacity_by_hand() -> None:
    scores = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    c = np.array([2.0, 1.0, 0.5])
    # z = [2, 1, 1]: f_0 = 2*1/2 + 0.5*1/1 = 1.5, f_1 = 2*1/2 + 1*1/1 = 2.0
    np.testing.assert_allclose(m2n2.shared_fitness(scores, capacity=c), [1.5, 2.0])
    # g(0, 1) = 1 * max(0, 1 - 0) / 1 = 1 on example 1; g(1, 0) = 0.5 * 1 / 1 on example 2
    np.testing.assert_allclose(m2n2.attraction(scores, 0, capacity=c), [0.0, 1.0])
    np.testing.assert_allclose(m2n2.attraction(scores, 1, capacity=c), [0.5, 0.0])
    np.testing.assert_allclose(m2n2.parent_a_probabilities(scores, capacity=c), [3 / 7, 4 / 7])
    # alpha = 0.5: z ** 0.5 = [sqrt 2, 1, 1]
    np.testing.assert_allclose(
        m2n2.shared_fitness(scores, 0.5, c), [2 / np.sqrt(2) + 0.5, 2 / np.sqrt(2) + 1.0]
    )


def test_capacity_decides_replacement() -> None:
    archive = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    child = np.array([0.0, 1.0, 1.0])
    # z = [2, 2, 2] with the child. All ones: f = [1, 1, 1], a tie: the first member goes.
    assert m2n2.replace_index(archive, child) == 0
    # c = [2, 1, 0.5]: f_0 = 1 + 0.25 = 1.25, f_1 = 1 + 0.5 = 1.5, child 0.5 + 0.25 = 0.75
    assert m2n2.replace_index(archive, child, capacity=[2.0, 1.0, 0.5]) is None
    # c = [0.5, 1, 2]: f_0 = 0.25 + 1 = 1.25, f_1 = 0.25 + 0.5 = 0.75, child 0.5 + 1 = 1.5
    assert m2n2.replace_index(archive, child, capacity=[0.5, 1.0, 2.0]) == 1


def test_all_ones_capacity_is_bit_identical() -> None:
    rng = np.random.default_rng(5)
    for alpha in (0.0, 0.5, 1.0, 2.0):
        scores = np.floor(rng.random((6, 40)) * 3) / 2
        scores[:, :3] = 0.0  # z = 0 columns
        child = np.floor(rng.random(40) * 3) / 2
        ones = np.ones(40)
        for f in (m2n2.shared_fitness, m2n2.parent_a_probabilities):
            assert f(scores, alpha).tobytes() == f(scores, alpha, ones).tobytes()
        for a in range(6):
            assert (
                m2n2.attraction(scores, a, alpha).tobytes()
                == m2n2.attraction(scores, a, alpha, ones).tobytes()
            )
            assert (
                m2n2.parent_b_probabilities(scores, a, alpha).tobytes()
                == m2n2.parent_b_probabilities(scores, a, alpha, ones).tobytes()
            )
        assert m2n2.replace_index(scores, child, alpha) == m2n2.replace_index(
            scores, child, alpha, ones
        )
        draws = [
            m2n2.draw_parents(scores, np.random.default_rng(k), alpha, capacity)
            for k in range(20)
            for capacity in (None, ones)
        ]
        assert draws[0::2] == draws[1::2]
