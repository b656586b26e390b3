"""The mergekit merge method ``m2n2``: M2N2's split-point SLERP over a whole model.

Parents A (``base_model``) and B are each one flat vector in the architecture's order
(:mod:`m2n2_plugin.merge.layout`): the first ``floor(split_point * n)`` parameters are mixed with
``t = mix_ratio`` (the weight on B), the rest with ``1 - mix_ratio``, one SLERP angle per tensor
(:func:`m2n2_plugin.kernel.split_slerp`); ``granularity: layer`` moves the split to the nearest
layer boundary (equal to mergekit's ``slerp`` over slices ``[0, k)``, ``t = w``, and ``[k, N)``,
``t = 1 - w``). The split index is global, but mergekit hands the kernel one tensor, in no order:
so the pair's layout is planned when mergekit validates the inputs (before any tensor is loaded
or the output exists) and the kernel finds it by the input ids (:mod:`m2n2_plugin.merge.inputs`).
A user's error is a :class:`MergekitError`, which ``mergekit-yaml`` prints in one line.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from typing import Annotated
from typing import Any

import click
import torch
from mergekit.merge_methods import BasePolicy
from mergekit.merge_methods import InputContract
from mergekit.merge_methods import MergeMethod
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods import merge_method
from mergekit.merge_methods import merge_state_dicts
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import FunctionalGroupMergeMethod
from pydantic import PlainValidator

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.merge.inputs import InMemoryParent
from m2n2_plugin.merge.inputs import PairLayouts
from m2n2_plugin.merge.kernel import MAX_SPLIT_POINTS
from m2n2_plugin.merge.kernel import MERGEKIT_DOT_THRESHOLD
from m2n2_plugin.merge.kernel import check_granularity
from m2n2_plugin.merge.kernel import check_unit_interval
from m2n2_plugin.merge.kernel import split_point_names
from m2n2_plugin.merge.kernel import split_slerp
from m2n2_plugin.merge.layout import Architecture
from m2n2_plugin.merge.layout import plan_pair
from m2n2_plugin.merge.layout import split_indices
from m2n2_plugin.merge.layout import state_dict_parent

if TYPE_CHECKING:
    from transformers import PretrainedConfig

METHOD_NAME = "m2n2"
_SLICE_LABEL = re.compile(r"\.slices\[(\d+)\]$")  # mergekit's group name of an output slice


class MergekitError(M2N2ConfigError, click.ClickException):
    """An :class:`M2N2ConfigError` as ``mergekit-yaml`` (a click command) shows it: one line,
    ``Error: m2n2: <message>``, exit status 1, no traceback. Raised only where mergekit calls
    this method; ``str(error)`` stays the bare message for the ``m2n2`` CLI."""

    def format_message(self) -> str:
        return f"{METHOD_NAME}: {self.message}"


@contextmanager
def _for_mergekit() -> Iterator[None]:
    """Turn a library :class:`M2N2ConfigError` into a :class:`MergekitError`."""
    try:
        yield
    except M2N2ConfigError as exc:  # a MergekitError too: the same message, one line
        raise MergekitError(str(exc)) from None


# Parameters are validated while mergekit plans, before the output directory exists; a default
# of None makes a missing one reach the validator (not mergekit's multi-line "Missing ...").


def _unit_interval(name: str) -> Callable[[Any], float]:
    def validate(value: Any) -> float:
        if value is None:
            raise MergekitError(f"parameters.{name} is required: a number in [0, 1]")
        with _for_mergekit():
            return check_unit_interval(name, value)

    return validate


def _granularity(value: Any) -> str:
    with _for_mergekit():
        return check_granularity(value)


def _more_split(name: str) -> Callable[[Any], float | None]:
    def validate(value: Any) -> float | None:
        if value is None:
            return None
        with _for_mergekit():
            return check_unit_interval(name, value)

    return validate


MixRatio = Annotated[float | None, PlainValidator(_unit_interval("mix_ratio"))]
SplitPoint = Annotated[float | None, PlainValidator(_unit_interval("split_point"))]
SplitPoint2 = Annotated[float | None, PlainValidator(_more_split("split_point_2"))]
SplitPoint3 = Annotated[float | None, PlainValidator(_more_split("split_point_3"))]
SplitPoint4 = Annotated[float | None, PlainValidator(_more_split("split_point_4"))]
Granularity = Annotated[str, PlainValidator(_granularity)]


class M2N2MergeMethod(FunctionalGroupMergeMethod):
    """mergekit's group method plus the up-front checks M2N2 needs.

    mergekit calls ``validate_inputs`` while planning, once per output slice (ids = its models)
    and once per output tensor (``group_name``). The slice call checks the pair and plans its
    layout anew; the kernel then looks it up by the pair's ids.
    """

    def __init__(self, spec: Any, implementation: Callable[..., torch.Tensor]) -> None:
        super().__init__(spec, implementation)
        #: Parent A's layout per pair of input ids: planned by validate_inputs, read by the kernel.
        self.layouts = PairLayouts()

    @classmethod
    def from_method(cls, method: MergeMethod) -> M2N2MergeMethod:
        """Re-wrap what ``@merge_method`` built (spec from the signature, the kernel)."""
        if not isinstance(method, FunctionalGroupMergeMethod):
            raise TypeError("expected a group kernel built by mergekit's @merge_method")
        return cls(method.spec, method.implementation)

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Hashable | None = None,
        *,
        group_name: str | None = None,
    ) -> None:
        with _for_mergekit():
            ids = list(input_ids)
            if len(ids) != 2:
                names = ", ".join(str(i) for i in ids)
                raise M2N2ConfigError(
                    "expects exactly two models, parent A (base_model) and parent B; "
                    f"got {len(ids)}" + (f": {names}" if names else "")
                )
            if base_id is None:
                raise M2N2ConfigError(
                    "base_model is required: it names parent A (the other model is parent B)"
                )
            if base_id not in ids:
                raise M2N2ConfigError(f"base_model {base_id} is not one of the two models")
            super().validate_inputs(ids, base_id, group_name=group_name)
            match = _SLICE_LABEL.search(group_name or "")
            if match and int(match.group(1)) > 0:
                raise M2N2ConfigError(
                    "merges whole models: give the two parents under `models:`, not several slices"
                )
            other_id = ids[1] if ids[0] == base_id else ids[0]
            layout = self.layouts.layout(base_id, other_id, plan=match is not None)
            if group_name and not match and group_name not in layout.spans:
                raise M2N2ConfigError(
                    f"tensor {group_name} is not part of parent A ({base_id}); m2n2 merges "
                    "whole models listed under `models:`"
                )


@M2N2MergeMethod.from_method
@merge_method(
    name=METHOD_NAME,
    pretty_name="M2N2 split-point SLERP",
    reference_url="https://arxiv.org/abs/2508.16204",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
)
def m2n2_merge_method(
    group: TensorGroup,
    mix_ratio: MixRatio = None,
    split_point: SplitPoint = None,
    granularity: Granularity = "element",
    split_point_2: SplitPoint2 = None,
    split_point_3: SplitPoint3 = None,
    split_point_4: SplitPoint4 = None,
) -> torch.Tensor:
    """Merge one tensor: find its span in parent A's layout, cut it at the global split(s).

    ``split_point_2`` .. ``_4`` (optional, ``search.split_points``) add split points; the
    ratio alternates between ``mix_ratio`` and ``1 - mix_ratio`` from one to the next.
    """
    with _for_mergekit():
        base, name = group.base, group.metadata.name
        if base is None or len(group.non_base) != 1 or name is None:
            raise M2N2ConfigError("needs parent A (base_model), one other model, tensor names")
        if mix_ratio is None or split_point is None:  # unreachable: the validators reject None
            raise M2N2ConfigError("mix_ratio and split_point are required")
        other = group.non_base[0]
        layout = m2n2_merge_method.layouts.layout(base.id, other.id)
        points = [split_point, split_point_2, split_point_3, split_point_4]
        splits = split_indices(layout, [p for p in points if p is not None], granularity)
        local = [layout.local_split(name, split, base.tensor.numel()) for split in splits]
        return split_slerp(
            base.tensor, other.tensor, mix_ratio, local, dot_threshold=MERGEKIT_DOT_THRESHOLD
        )


def m2n2_merge_state_dicts(
    parent_a: Mapping[str, torch.Tensor],
    parent_b: Mapping[str, torch.Tensor],
    *,
    mix_ratio: float,
    split_point: float | Sequence[float],
    config: PretrainedConfig,
    granularity: str = "element",
) -> dict[str, torch.Tensor]:
    """Merge two state dicts exactly as ``mergekit-yaml`` with ``merge_method: m2n2`` would.

    Runs mergekit's own ``merge_state_dicts``; the layout travels in the input ids
    (:class:`InMemoryParent`). ``config`` (the parents' transformers config) selects mergekit's
    architecture and says whether embeddings are tied. The result has mergekit's tensor names,
    in the architecture's order; a tied weight (``lm_head.weight`` of a tied model) maps to the
    merged tensor it is tied to; tensors the architecture does not list are left out, as
    ``mergekit-yaml`` leaves them out.
    """
    plan = plan_pair(
        Architecture.for_config(config),
        state_dict_parent(parent_a, "parent A"),
        state_dict_parent(parent_b, "parent B"),
        same_keys=True,
    )
    id_a = InMemoryParent("parent_a", plan.layout)
    id_b = InMemoryParent("parent_b", plan.layout)
    inputs = {
        id_a: {name: parent_a[key] for name, key in plan.sources_a.items()},
        id_b: {name: parent_b[key] for name, key in plan.sources_b.items()},
    }
    points = split_point if isinstance(split_point, Sequence) else [split_point]
    if not 1 <= len(points) <= MAX_SPLIT_POINTS:
        raise M2N2ConfigError(f"1 to {MAX_SPLIT_POINTS} split points, got {len(points)}")
    parameters: dict[str, Any] = {"mix_ratio": mix_ratio, "granularity": granularity}
    parameters.update(zip(split_point_names(len(points)), points, strict=True))
    with torch.no_grad():
        merged = merge_state_dicts(inputs, m2n2_merge_method, parameters=parameters, base=id_a)
    for name, target in plan.tied.items():
        merged[name] = merged[target]
    return merged


_REGISTER_LOCK = threading.Lock()


def register() -> MergeMethod:
    """Register ``m2n2`` with mergekit; idempotent (mergekit raises on a duplicate name, so a
    second call, or a reloaded copy of this module, leaves the registry alone)."""
    from mergekit.merge_methods import register as mergekit_register

    with _REGISTER_LOCK:
        for method in registered_methods():
            if method.spec.name == METHOD_NAME:
                if type(method).__name__ != M2N2MergeMethod.__name__:
                    warnings.warn(
                        f"mergekit already has a different method named {METHOD_NAME!r}; "
                        "m2n2_plugin leaves it in place",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                return method
        mergekit_register(m2n2_merge_method)
        return m2n2_merge_method


# Importing this module registers the method (the import hook defers to this line when it is
# this very import that pulls in mergekit.merge_methods).
register()
