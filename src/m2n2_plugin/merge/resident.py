"""A child that lives in one resident model: merge two checkpoints straight into its tensors.

``m2n2 evolve`` scores every child on one resident Hugging Face model. The plain way to put a
child there reads both parents' state dicts (two models of memory), merges them into a child
state dict (a third) and copies that into the model: three models on top of the model itself.
Here the child is made one tensor at a time, in the model: parent A's and parent B's tensors are
read from their safetensors files into two scratch buffers (each the size of the largest tensor,
kept by the caller for its next merge: :class:`MergeScratch`), and the kernel's arithmetic
(:func:`m2n2_plugin.kernel.split_slerp`) writes the child straight into the model's parameter.
The memory a merge needs beyond the model is those two buffers (plus, for a bfloat16 or float16
merge, the kernel's float32 temporaries of one tensor), not models.

Parents are read with positioned reads (``os.preadv``) into those buffers, not through
``safetensors.safe_open``: ``safe_open`` memory-maps the file, and every page a merge touches
stays in the process's resident set (as file-backed RSS) until the file is closed, i.e. both
parents (two models) by the end of a merge, and each page costs a page fault. A positioned read
copies from the page cache into memory we own and leaves nothing mapped. ``io="mmap"`` keeps the
``safe_open`` route for comparison (``benchmarks/bench_resident.py`` measures both).

Where a tensor lands in memory does not matter to the bits: the kernel's angle is summed
elementwise-then-in-float64 over fixed blocks (:func:`m2n2_plugin.kernel.squared_norm`), which
was checked to give the same bits at every 4-byte address offset modulo 64, so buffers are
plain allocations (an earlier version placed tensors at their file offset's alignment, as a
memory map would, because ``torch.dot`` then went through BLAS).

The child is exactly what mergekit's ``m2n2`` writes for the same parents, ``mix_ratio``,
``split_point`` and ``granularity`` (``mergekit-yaml``, or in memory
:func:`m2n2_plugin.merge_method.m2n2_merge_state_dicts`):

* the layout (which tensors count, in which order, aliases, a tied ``lm_head`` counted once)
  is planned by the same code (:func:`m2n2_plugin.layout.plan_pair`) from the files' headers;
  the architecture, the costly part, is built once per run by the caller and passed in;
* each tensor gets the same local split and the same kernel call;
* dtypes follow mergekit: ``dtype`` (mergekit's ``dtype``) is what both parents are cast to
  before merging, else the two are promoted per tensor (``torch.promote_types``); ``out_dtype``
  (mergekit's ``out_dtype``) is what the result is cast to; then it is cast to the model's
  dtype as it is written into the model.

A tied weight (``lm_head`` tied to the embeddings) is written once: the model's two names share
one storage. Names are the checkpoint's (mergekit's) names, which are the model's
``state_dict`` names for models saved with ``save_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import cast

import torch

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.merge.checkpoint import IO
from m2n2_plugin.merge.checkpoint import Checkpoint
from m2n2_plugin.merge.checkpoint import NormMemo
from m2n2_plugin.merge.kernel import MERGEKIT_DOT_THRESHOLD
from m2n2_plugin.merge.kernel import check_granularity
from m2n2_plugin.merge.kernel import check_unit_interval
from m2n2_plugin.merge.kernel import cosine
from m2n2_plugin.merge.kernel import split_slerp
from m2n2_plugin.merge.layout import Architecture
from m2n2_plugin.merge.layout import ModelLayout
from m2n2_plugin.merge.layout import PairPlan
from m2n2_plugin.merge.layout import Parent
from m2n2_plugin.merge.layout import plan_pair
from m2n2_plugin.merge.layout import split_indices
from m2n2_plugin.merge.models import save_tensors_atomic
from m2n2_plugin.merge.resident_model import check_model_tensors
from m2n2_plugin.merge.resident_model import on_cuda
from m2n2_plugin.merge.resident_model import save_model_tensors
from m2n2_plugin.merge.resident_model import storage_id

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "MergeScratch",
    "ResidentChild",
    "merge_checkpoints",
    "merge_into_model",
    "save_child",
]

# Child dtype -> model dtypes that hold every value of it exactly (cast there and back).
_HOLDS_EXACTLY = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}


def _plan(arch: Architecture, a: Checkpoint, b: Checkpoint) -> PairPlan:
    """The pair's plan from the headers (cheap: the architecture is already built)."""
    return plan_pair(
        arch, Parent(f"parent A ({a.path})", a.shapes), Parent(f"parent B ({b.path})", b.shapes)
    )


# --------------------------------------------------------------------------------------------
# Merging.


@dataclass(frozen=True)
class ResidentChild:
    """What :func:`merge_into_model` put into the model, enough to save it as mergekit would.

    Attributes:
        dtypes: ``{name: dtype}`` of each tensor mergekit would write for this child (after
            ``out_dtype``), in the architecture's order; tied duplicates are not listed.
        exact: whether the model's tensors hold the child exactly, i.e. casting them back to
            ``dtypes`` gives mergekit's tensors (false when e.g. a float32 child lives in a
            bfloat16 model; :func:`save_child` then merges it again from the parents).
    """

    parent_a: Path
    parent_b: Path
    mix_ratio: float
    split_point: float | tuple[float, ...]
    granularity: str
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    dtypes: Mapping[str, torch.dtype] = field(repr=False)
    exact: bool = True

    @property
    def names(self) -> list[str]:
        """The child's tensor names, as its safetensors file holds them."""
        return list(self.dtypes)


_DOT = MERGEKIT_DOT_THRESHOLD


def _merge_tensor(
    a: Checkpoint,
    b: Checkpoint,
    plan: PairPlan,
    layout: ModelLayout,
    name: str,
    *,
    mix_ratio: float,
    splits: Sequence[int],
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    dest: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.dtype]:
    """Child tensor ``name`` and the dtype mergekit writes it in; into ``dest`` if given.

    The arithmetic runs where ``dest`` lives: on a GPU each parent tensor is read into a host
    buffer, copied to the device and cast there, and the kernel runs there.
    """
    entry_a = a.entries[plan.sources_a[name]]
    entry_b = b.entries[plan.sources_b[name]]
    work = dtype or torch.promote_types(entry_a.dtype, entry_b.dtype)
    written = out_dtype or work
    local = [layout.local_split(name, split, entry_a.numel) for split in splits]
    source_a, source_b = plan.sources_a[name], plan.sources_b[name]
    device = None if dest is None or dest.device.type == "cpu" else dest.device
    lean = dest is not None and dest.dtype == work == written and dest.is_contiguous()
    if lean and (device is not None or (a.io == "read" and entry_a.dtype == work)):
        # Parent A goes straight into the destination; the kernel then computes the child
        # over it (on a GPU: no device buffer for parent A at all).
        parent_a = a.get(source_a, dtype=work, out=dest)
    else:
        parent_a = a.get(source_a, dtype=work, reuse=True, device=device)
    parent_b = b.get(source_b, dtype=work, reuse=True, device=device)
    norms = (a.squared_norm(source_a, parent_a), b.squared_norm(source_b, parent_b))
    cos = cosine(parent_a, parent_b, squared_norms=norms)
    if lean:
        # The kernel writes the child straight into the destination (the model's parameter).
        split_slerp(parent_a, parent_b, mix_ratio, local, cos=cos, dot_threshold=_DOT, out=dest)
        return dest, written
    child = split_slerp(parent_a, parent_b, mix_ratio, local, cos=cos, dot_threshold=_DOT)
    if out_dtype is not None:
        child = child.to(out_dtype)
    if dest is None:
        return child, written
    dest.copy_(child)
    return dest, written


@dataclass
class MergeScratch:
    """What one merge leaves for the next: the parents' read buffers and their tensors' norms.

    ``a`` and ``b`` (dtype -> bytes) each grow to the size of the largest tensor: a fresh
    buffer costs a page fault per 4 KiB on every merge (~70 ms for the 113 MB embedding matrix
    of SmolLM2-135M here). ``norms`` saves the |x|^2 pass over a parent merged again. A caller
    that merges many children (``m2n2 evolve``) makes one per run and passes it to every merge;
    dropping it frees them. Nothing here changes a bit of the child.
    """

    a: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    b: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    norms: NormMemo = field(default_factory=NormMemo)


def merge_into_model(
    model: torch.nn.Module,
    parent_a: str | os.PathLike[str],
    parent_b: str | os.PathLike[str],
    *,
    mix_ratio: float,
    split_point: float | Sequence[float],
    granularity: str = "element",
    layout: ModelLayout | None = None,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    io: IO = "read",
    scratch: MergeScratch | None = None,
    arch: Architecture | None = None,
) -> ResidentChild:
    """Merge parents A and B with ``m2n2`` straight into ``model``'s tensors, in place.

    Args:
        model: the resident model (a transformers model: its ``config`` gives the
            architecture); every parameter is overwritten.
        parent_a, parent_b: a model folder (single or sharded safetensors) or one
            ``.safetensors`` file each; parent A is mergekit's ``base_model``.
        mix_ratio, split_point, granularity: the ``m2n2`` parameters; several split points
            (``search.split_points``) alternate the ratio between them.
        layout: parent A's layout if the caller has it (e.g. from
            :func:`~m2n2_plugin.merge_inputs.layout_for_model`); by default it is planned from the
            headers. It must list the same tensors.
        arch: the model's :class:`~m2n2_plugin.layout.Architecture`, built once by a caller
            that merges many children (``m2n2 evolve``); by default built from the config.
        dtype: mergekit's ``dtype``: both parents are cast to it before merging (default:
            promoted per tensor, as mergekit does).
        out_dtype: mergekit's ``out_dtype``: the child is cast to it (default: the merge
            dtype) before it is cast to the model's dtype.
        io: ``"read"`` (positioned reads, the default) or ``"mmap"`` (``safe_open``).
        scratch: the read buffers and norms to reuse (:class:`MergeScratch`, one per run);
            by default they are made for this merge only.

    Everything that can be checked (layout, names, shapes, parameters) is checked before the
    first tensor is written; an I/O error mid-way leaves the model partly overwritten.

    Returns:
        A :class:`ResidentChild`, for :func:`save_child`.
    """
    check_unit_interval("mix_ratio", mix_ratio)
    check_granularity(granularity)
    arch = arch or Architecture.for_config(cast("PretrainedConfig", model.config))
    params = model.state_dict()
    scratch = scratch or MergeScratch()
    pin = on_cuda(model)
    with (
        Checkpoint(parent_a, io, scratch.a, pin_memory=pin, norms=scratch.norms) as a,
        Checkpoint(parent_b, io, scratch.b, pin_memory=pin, norms=scratch.norms) as b,
    ):
        plan = _plan(arch, a, b)
        used = plan.layout if layout is None else layout
        if used.names != plan.layout.names or dict(used.shapes) != dict(plan.layout.shapes):
            raise M2N2ConfigError(f"the layout given does not describe parent A ({a.path})")
        splits = split_indices(used, split_point, granularity)
        tied = {n: t for n, t in plan.tied.items() if n in params}
        check_model_tensors(
            params,
            model.named_parameters(remove_duplicate=False),
            used.names,
            tied,
            used.shapes,
            f"parent A ({a.path})",
        )
        dtypes: dict[str, torch.dtype] = {}
        exact = True
        with torch.no_grad():
            for name in used.names:
                dest = params[name]
                _, written = _merge_tensor(
                    a,
                    b,
                    plan,
                    used,
                    name,
                    mix_ratio=mix_ratio,
                    splits=splits,
                    dtype=dtype,
                    out_dtype=out_dtype,
                    dest=dest,
                )
                dtypes[name] = written
                exact = exact and (
                    dest.dtype == written or dest.dtype in _HOLDS_EXACTLY.get(written, ())
                )
            for name, target in tied.items():
                if storage_id(params[name]) != storage_id(params[target]):
                    params[name].copy_(params[target])  # a model that does not share them
    return ResidentChild(
        parent_a=Path(parent_a),
        parent_b=Path(parent_b),
        mix_ratio=mix_ratio,
        split_point=split_point if isinstance(split_point, float) else tuple(split_point),
        granularity=granularity,
        dtype=dtype,
        out_dtype=out_dtype,
        dtypes=dtypes,
        exact=exact,
    )


def merge_checkpoints(
    parent_a: str | os.PathLike[str],
    parent_b: str | os.PathLike[str],
    *,
    config: PretrainedConfig,
    mix_ratio: float,
    split_point: float | Sequence[float],
    granularity: str = "element",
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    io: IO = "read",
    arch: Architecture | None = None,
) -> dict[str, torch.Tensor]:
    """The child as a state dict (mergekit's names, no tied duplicates), parents read lazily.

    One model of memory (the child) instead of three; for when no resident model can hold the
    child exactly (see :func:`save_child`). ``arch``: as for :func:`merge_into_model`.
    """
    check_unit_interval("mix_ratio", mix_ratio)
    arch = arch or Architecture.for_config(config)
    with Checkpoint(parent_a, io) as a, Checkpoint(parent_b, io) as b:
        plan = _plan(arch, a, b)
        splits = split_indices(plan.layout, split_point, granularity)
        child: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in plan.layout.names:
                child[name], _ = _merge_tensor(
                    a,
                    b,
                    plan,
                    plan.layout,
                    name,
                    mix_ratio=mix_ratio,
                    splits=splits,
                    dtype=dtype,
                    out_dtype=out_dtype,
                    dest=None,
                )
    return child


# --------------------------------------------------------------------------------------------
# Seeds in, children out.


def save_child(model: torch.nn.Module, child: ResidentChild, path: str | os.PathLike[str]) -> None:
    """Write the child now in ``model`` to ``path`` with exactly mergekit's tensors.

    The file holds the checkpoint's names (no tied duplicates) in the dtypes mergekit writes.
    From the model's memory when it holds the child exactly; otherwise (a model of a narrower
    dtype than the child) the child is merged again from its parents, which must still exist.
    """
    if child.exact:
        save_model_tensors(model, path, child.dtypes)
        return
    tensors = merge_checkpoints(
        child.parent_a,
        child.parent_b,
        config=cast("PretrainedConfig", model.config),
        mix_ratio=child.mix_ratio,
        split_point=child.split_point,
        granularity=child.granularity,
        dtype=child.dtype,
        out_dtype=child.out_dtype,
    )
    save_tensors_atomic(tensors, Path(path))
