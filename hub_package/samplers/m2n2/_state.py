"""What the sampler keeps in the study's storage, and how it is encoded.

Study system attrs:
    ``m2n2:fold``       the fold cache, a JSON object (see :class:`FoldState`).
    ``m2n2:n_examples`` N, the length of every score vector in the study (set by the first
                        ``set_scores``).
    ``m2n2:capacity``   the per-example capacity ``c_j``, encoded as ``m2n2:scores`` below
                        (chunks in ``m2n2:capacity:0`` ...); absent: every ``c_j`` is 1.
Trial system attrs:
    ``m2n2:plan``       the trial's plan, a JSON object: ``role`` ("seed" or "child"), ``seed``
                        (seed index or null), ``parents`` ([A, B] trial numbers or null),
                        ``mix_ratio``, ``split_point``, and ``trial`` (its number: a retried
                        trial inherits the failed one's attrs, and a plan whose number is
                        another trial's is not its own).
    ``m2n2:scores``     the score vector, ``"<kind>:<N>:<base64>"`` where kind is ``bits``
                        (every value 0 or 1; numpy.packbits, 1 bit per example) or ``f8``
                        (little-endian float64). A payload over 60,000 characters (MySQL's
                        TEXT holds 64 KB) is split: ``"<kind>:<N>:*<k>"`` here and the pieces
                        in ``m2n2:scores:0`` ... ``m2n2:scores:<k-1>``.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np
from numpy.typing import NDArray


PREFIX = "m2n2:"
FOLD_KEY = PREFIX + "fold"
N_EXAMPLES_KEY = PREFIX + "n_examples"
CAPACITY_KEY = PREFIX + "capacity"
PLAN_KEY = PREFIX + "plan"
SCORES_KEY = PREFIX + "scores"
#: Longest attr value written in one piece; MySQL's TEXT column holds 65,535 bytes.
CHUNK_CHARS = 60_000
FOLD_FORMAT = 1


def encode_scores(scores: NDArray[np.float64], key: str = SCORES_KEY) -> dict[str, str]:
    """The system attrs that hold ``scores`` (validated, 1-D float64) under ``key``."""
    if np.all((scores == 0.0) | (scores == 1.0)):
        kind, payload = "bits", np.packbits(scores == 1.0).tobytes()
    else:
        kind, payload = "f8", scores.astype("<f8").tobytes()
    text = base64.b64encode(payload).decode("ascii")
    head = f"{kind}:{scores.size}:"
    if len(text) <= CHUNK_CHARS:
        return {key: head + text}
    pieces = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)]
    attrs = {f"{key}:{i}": piece for i, piece in enumerate(pieces)}
    attrs[key] = f"{head}*{len(pieces)}"  # written last: the header makes it visible
    return attrs


def decode_scores(
    system_attrs: dict[str, Any], key: str = SCORES_KEY
) -> NDArray[np.float64] | None:
    """The vector stored in system attrs under ``key``, or None if there is none."""
    value = system_attrs.get(key)
    if not isinstance(value, str):
        return None
    kind, n_text, text = value.split(":", 2)
    n = int(n_text)
    if text.startswith("*"):
        text = "".join(system_attrs[f"{key}:{i}"] for i in range(int(text[1:])))
    payload = base64.b64decode(text)
    if kind == "bits":
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=n)
        return bits.astype(np.float64)
    if kind == "f8":
        return np.frombuffer(payload, dtype="<f8").astype(np.float64)
    raise ValueError(f"unknown score encoding {kind!r}")


@dataclasses.dataclass
class FoldState:
    """The archive as of a fold position: the fold of every finished trial numbered below it.

    ``slots[i]`` is the trial number of the member in slot ``i`` (None: empty). ``seeds`` are the
    seed indices of folded COMPLETE seed trials (with scores) and PRUNED ones (rejected early:
    not issued again); ``n_folded`` counts the COMPLETE trials with
    scores that were folded (each trial once, whether it entered the archive or not).
    """

    archive_size: int
    alpha: float
    position: int = 0
    slots: list[int | None] = dataclasses.field(default_factory=list)
    n_examples: int | None = None
    seeds: list[int] = dataclasses.field(default_factory=list)
    n_folded: int = 0

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [None] * self.archive_size

    def to_json(self) -> dict[str, Any]:
        # What ``{"format": FOLD_FORMAT, **dataclasses.asdict(self)}`` gives, without its
        # recursive deep copy (every field is a scalar or a flat list of scalars).
        return {
            "format": FOLD_FORMAT,
            "archive_size": self.archive_size,
            "alpha": self.alpha,
            "position": self.position,
            "slots": list(self.slots),
            "n_examples": self.n_examples,
            "seeds": list(self.seeds),
            "n_folded": self.n_folded,
        }

    def copy(self) -> FoldState:
        """An independent copy (the lists are copied), cheaper than ``copy.deepcopy``."""
        return FoldState(
            self.archive_size,
            self.alpha,
            self.position,
            list(self.slots),
            self.n_examples,
            list(self.seeds),
            self.n_folded,
        )

    @classmethod
    def from_json(cls, value: Any) -> FoldState:
        if not isinstance(value, dict) or value.get("format") != FOLD_FORMAT:
            raise ValueError(f"unreadable M2N2 fold state in the study: {value!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in value.items() if k in fields})
        state.slots = list(state.slots)
        state.seeds = list(state.seeds)
        return state

    @property
    def filled(self) -> NDArray[np.bool_]:
        return np.array([number is not None for number in self.slots], dtype=bool)


def own_plan(system_attrs: Any, number: int) -> dict[str, Any] | None:
    """The trial's plan, or None (no plan yet, or one copied from another trial by a retry)."""
    plan = system_attrs.get(PLAN_KEY) if system_attrs is not None else None
    if isinstance(plan, dict) and plan.get("trial") == number:
        return plan
    return None
