"""Where a drawn split point falls: over every parameter (the paper), or only some tensors'.

A split point is drawn in [0, 1] by the sampler; :class:`SplitSpace` turns it into the
model-wide split point that every merge path reads (:meth:`ModelLayout.split_index`), so the
child's recipe for ``mergekit-yaml`` stays a plain ``split_point``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from functools import cached_property

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.merge.kernel import check_unit_interval
from m2n2_plugin.merge.kernel import split_index
from m2n2_plugin.merge.layout import ModelLayout


@dataclass(frozen=True)
class SplitSpace:
    """Where a drawn split point may fall: every parameter (the paper), or only some tensors'.

    ``search.split_over: differing`` draws the split point over the tensors in which the seed
    models differ. A tensor that is identical in every seed stays identical in every child
    (SLERP of a tensor with itself is that tensor, bit for bit), so a split inside it changes
    nothing there: it only decides which ratio every later tensor gets. With two fine-tunes
    that froze their embeddings (21 % of SmolLM2-135M's parameters, first in the order), one
    child in five would be the "no split point" ablation.

    :meth:`split_point` turns a draw ``u`` in [0, 1] into a model-wide split point that every
    merge path (mergekit's ``m2n2`` included) reads as usual, so a child's recipe is unchanged.

    Attributes:
        total: parameters in the whole model (``ModelLayout.total``).
        spans: ``(offset, numel)`` of the tensors a split may fall in, in the model's order;
            empty means every parameter (the draw is the split point).
    """

    total: int
    spans: tuple[tuple[int, int], ...] = ()

    @classmethod
    def over(cls, layout: ModelLayout, names: Collection[str] | None = None) -> SplitSpace:
        """The space over tensors ``names`` of ``layout`` (None: over every parameter)."""
        if names is None:
            return cls(layout.total)
        unknown = sorted(set(names) - set(layout.spans))
        if unknown:
            raise M2N2ConfigError(f"no tensor {unknown[0]!r} in the model's layout")
        spans = tuple(span for name, span in layout.spans.items() if name in names and span[1])
        if not spans:
            raise M2N2ConfigError("a split point needs at least one tensor that can differ")
        return cls(layout.total, spans)

    @cached_property
    def size(self) -> int:
        """Parameters a split may fall among."""
        return sum(numel for _, numel in self.spans) if self.spans else self.total

    def split_point(self, u: float) -> float:
        """The model-wide split point for a draw ``u`` over this space.

        The ``floor(u * size)``-th parameter of the space is the first after the split; the
        result sits half a parameter past that index, so ``floor(split_point * total)`` gives
        it back exactly (``u = 1``: 1.0, every parameter before the split).
        """
        u = check_unit_interval("split_point", u)
        if not self.spans:
            return u
        k = split_index(u, self.size)
        if k >= self.size:
            return 1.0
        for offset, numel in self.spans:
            if k < numel:
                return (offset + k + 0.5) / self.total
            k -= numel
        raise AssertionError("unreachable: k < size")
