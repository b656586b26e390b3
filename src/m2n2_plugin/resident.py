"""A child that lives in one resident model: merge two checkpoints straight into its tensors.

``m2n2 evolve`` scores every child on one resident Hugging Face model. The plain way to put a
child there reads both parents' state dicts (two models of memory), merges them into a child
state dict (a third) and copies that into the model: three models on top of the model itself.
Here the child is made one tensor at a time, in the model: parent A's and parent B's tensors are
read from their safetensors files into two scratch buffers (each the size of the largest tensor,
kept with the model for its next merge), and the kernel's arithmetic
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

import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import cast

import torch

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.kernel import MERGEKIT_DOT_THRESHOLD
from m2n2_plugin.kernel import check_granularity
from m2n2_plugin.kernel import check_unit_interval
from m2n2_plugin.kernel import cosine
from m2n2_plugin.kernel import split_slerp
from m2n2_plugin.kernel import squared_norm
from m2n2_plugin.layout import Architecture
from m2n2_plugin.layout import ModelLayout
from m2n2_plugin.layout import PairPlan
from m2n2_plugin.layout import Parent
from m2n2_plugin.layout import plan_pair
from m2n2_plugin.layout import read_header
from m2n2_plugin.layout import tensor_files
from m2n2_plugin.models import save_tensors_atomic

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "Checkpoint",
    "ResidentChild",
    "load_checkpoint_into_model",
    "merge_checkpoints",
    "merge_into_model",
    "release_buffers",
    "save_child",
    "save_model_tensors",
]

IO = Literal["read", "mmap"]

# safetensors dtype codes (the format's spec) that torch can hold.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Child dtype -> model dtypes that hold every value of it exactly (cast there and back).
_HOLDS_EXACTLY = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
}
# Squared norms of parent tensors, per file version: (device, inode, size, mtime) -> {(tensor,
# dtype read as): |x|^2}. Archive files are written once under a fresh name and never changed,
# so a member merged again (it is a parent many times) needs only the <a, b> pass. The oldest
# files' entries go first beyond _NORM_FILES (a few hundred floats per file).
_NORM_CACHE: OrderedDict[tuple[int, ...], dict[tuple[str, torch.dtype], float]] = OrderedDict()
_NORM_FILES = 256
_NORM_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Reading a checkpoint one tensor at a time.


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: file, absolute offset, size, and how to read them."""

    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _plain_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


class Checkpoint:
    """The tensors of a model folder (one or sharded safetensors) or of one safetensors file.

    Only the headers are read when it opens; :meth:`get` reads one tensor when asked. Use it as
    a context manager: the files stay open (and, with ``io="mmap"``, mapped) until it closes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        io: IO = "read",
        scratch: dict[torch.dtype, torch.Tensor] | None = None,
    ) -> None:
        if io not in ("read", "mmap"):
            raise ValueError(f"io must be 'read' or 'mmap', got {io!r}")
        self.path = Path(path)
        self.io = io
        if self.path.is_dir():
            self.files = tensor_files(self.path)
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise M2N2Error(f"model {str(self.path)!r} not found (no such file or folder)")
        self.entries: dict[str, _Entry] = {}
        # Every file is opened now: a file deleted later (an evicted archive member) stays
        # readable through its open descriptor until this checkpoint closes.
        self._fds: list[int] = []
        self._versions: list[tuple[int, ...]] = []
        self._mapped: dict[int, Any] = {}
        # dtype -> byte buffer for ``reuse`` reads; the caller may lend one that outlives us.
        self._scratch = {} if scratch is None else scratch
        try:
            for index, file in enumerate(self.files):
                try:
                    self._fds.append(os.open(file, os.O_RDONLY))
                except OSError as exc:
                    raise M2N2Error(f"cannot read {file} ({exc.strerror})") from exc
                st = os.fstat(self._fds[index])
                self._versions.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                self._add_entries(index, file, *read_header(file, self._fds[index]))
                if io == "mmap":
                    self._safe_open(index)
        except BaseException:
            self.close()
            raise

    def _add_entries(
        self, index: int, file: Path, data_start: int, header: Mapping[str, Any]
    ) -> None:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise M2N2Error(f"{file}: tensor {name!r} has unsupported dtype {info!r}")
            if name in self.entries:
                raise M2N2Error(f"{self.path}: tensor {name!r} is stored twice")
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise M2N2Error(f"{file}: tensor {name!r} has a bad size in the header")
            self.entries[name] = _Entry(index, dtype, shape, data_start + begin, nbytes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` in the files' header order."""
        return {name: entry.shape for name, entry in self.entries.items()}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (unmapping them) and let go of the scratch buffers."""
        while self._fds:
            os.close(self._fds.pop())
        self._mapped.clear()
        self._scratch = {}  # a lent scratch stays with its owner

    def _safe_open(self, file: int) -> Any:
        handle = self._mapped.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.files[file]), framework="pt")
            self._mapped[file] = handle
        return handle

    def _read_into(self, entry: _Entry, dest: torch.Tensor) -> None:
        """Copy the stored bytes into ``dest`` (contiguous, CPU, the stored dtype)."""
        if entry.nbytes == 0:
            return
        fd = self._fds[entry.file]
        view = _byte_view(dest)
        done = 0
        while done < entry.nbytes:
            count = os.preadv(fd, [view[done:]], entry.start + done)
            if count <= 0:
                raise M2N2Error(f"{self.files[entry.file]} is truncated")
            done += count

    def _raw(self, name: str, entry: _Entry, reuse: bool) -> torch.Tensor:
        """The tensor as stored; with ``reuse`` it lives in this checkpoint's scratch buffer
        (valid until the next ``reuse`` read), so that reading many tensors allocates once."""
        if self.io == "mmap":
            return self._safe_open(entry.file).get_tensor(name)
        if not reuse:
            dest = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            storage = self._scratch.get(entry.dtype)
            if storage is None or storage.numel() < entry.numel:
                size = max(e.numel for e in self.entries.values() if e.dtype == entry.dtype)
                storage = self._scratch[entry.dtype] = torch.empty(size, dtype=entry.dtype)
            dest = storage[: entry.numel].view(entry.shape)
        self._read_into(entry, dest)
        return dest

    def get(
        self,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        reuse: bool = False,
    ) -> torch.Tensor:
        """Tensor ``name``, cast to ``dtype`` if given.

        With ``out`` the value is written into ``out`` (cast to its dtype) and ``out`` returned;
        when ``out`` already has the stored dtype the bytes are read straight into it. Without
        ``out``, with ``reuse`` it may live in a scratch buffer that the next ``reuse`` read
        overwrites.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise M2N2Error(f"{self.path} has no tensor {name!r}")
        target = dtype or entry.dtype
        if out is not None:
            if tuple(out.shape) != entry.shape:
                raise M2N2Error(
                    f"tensor {name!r} is {entry.shape} in {self.path} but {tuple(out.shape)} "
                    "in the model"
                )
            if self.io == "read" and out.dtype == entry.dtype == target and _plain_cpu(out):
                self._read_into(entry, out)
                return out
        raw = self._raw(name, entry, reuse=reuse or out is not None)
        value = raw if raw.dtype == target else raw.to(target)
        if out is None:
            return value
        out.copy_(value)
        return out

    def squared_norm(self, name: str, value: torch.Tensor) -> float:
        """``kernel.squared_norm(value)`` for ``value`` = tensor ``name`` as read from this
        checkpoint (in ``value``'s dtype), remembered for this version of the file."""
        version = self._versions[self.entries[name].file]
        key = (name, value.dtype)
        with _NORM_LOCK:
            known = _NORM_CACHE.get(version, {}).get(key)
        if known is not None:
            return known
        norm = squared_norm(value)
        with _NORM_LOCK:
            _NORM_CACHE.setdefault(version, {})[key] = norm
            _NORM_CACHE.move_to_end(version)
            while len(_NORM_CACHE) > _NORM_FILES:
                _NORM_CACHE.popitem(last=False)
        return norm


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
    split_point: float
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


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _merge_tensor(
    a: Checkpoint,
    b: Checkpoint,
    plan: PairPlan,
    layout: ModelLayout,
    name: str,
    *,
    mix_ratio: float,
    split: int,
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    dest: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.dtype]:
    """Child tensor ``name`` and the dtype mergekit writes it in; into ``dest`` if given."""
    entry_a = a.entries[plan.sources_a[name]]
    entry_b = b.entries[plan.sources_b[name]]
    work = dtype or torch.promote_types(entry_a.dtype, entry_b.dtype)
    written = out_dtype or work
    local = layout.local_split(name, split, entry_a.numel)
    source_a, source_b = plan.sources_a[name], plan.sources_b[name]
    lean = dest is not None and dest.dtype == work == written and _plain_cpu(dest)
    if lean and a.io == "read" and entry_a.dtype == work:
        parent_a = a.get(source_a, out=dest)  # the kernel then computes the child over it
    else:
        parent_a = a.get(source_a, dtype=work, reuse=True)
    parent_b = b.get(source_b, dtype=work, reuse=True)
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


def _check_model_tensors(
    params: Mapping[str, torch.Tensor],
    parameters: Iterable[tuple[str, torch.Tensor]],
    names: Iterable[str],
    tied: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    what: str,
) -> None:
    """Fail, before anything is written, unless the names cover every model parameter."""
    names = list(names)
    for name in (*names, *tied):
        if name not in params:
            raise M2N2Error(f"tensor {name!r} of {what} does not belong to the model")
    for name in names:
        if tuple(params[name].shape) != tuple(shapes[name]):
            raise M2N2Error(
                f"tensor {name!r} is {tuple(shapes[name])} in {what} but "
                f"{tuple(params[name].shape)} in the model"
            )
    covered = {_storage(params[name]) for name in (*names, *tied)}
    for name, param in parameters:
        if _storage(param) not in covered:
            raise M2N2Error(f"the model's tensor {name!r} is not in {what}")


# The resident model's two scratch buffers (parent A's, parent B's; dtype -> bytes), kept for
# its next merge: a fresh buffer costs a page fault per 4 KiB on every merge (~70 ms for the
# 113 MB embedding matrix of SmolLM2-135M here). Weak: they go with the model.
_SCRATCH: weakref.WeakKeyDictionary[torch.nn.Module, tuple[dict[torch.dtype, torch.Tensor], ...]]
_SCRATCH = weakref.WeakKeyDictionary()


def release_buffers(model: torch.nn.Module) -> None:
    """Free the scratch buffers :func:`merge_into_model` keeps with ``model``."""
    _SCRATCH.pop(model, None)


def merge_into_model(
    model: torch.nn.Module,
    parent_a: str | os.PathLike[str],
    parent_b: str | os.PathLike[str],
    *,
    mix_ratio: float,
    split_point: float,
    granularity: str = "element",
    layout: ModelLayout | None = None,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    io: IO = "read",
    keep_buffers: bool = True,
    arch: Architecture | None = None,
) -> ResidentChild:
    """Merge parents A and B with ``m2n2`` straight into ``model``'s tensors, in place.

    Args:
        model: the resident model (a transformers model: its ``config`` gives the
            architecture); every parameter is overwritten.
        parent_a, parent_b: a model folder (single or sharded safetensors) or one
            ``.safetensors`` file each; parent A is mergekit's ``base_model``.
        mix_ratio, split_point, granularity: the ``m2n2`` parameters.
        layout: parent A's layout if the caller has it (e.g. from
            :func:`~m2n2_plugin.layout.layout_for_model`); by default it is planned from the
            headers. It must list the same tensors.
        arch: the model's :class:`~m2n2_plugin.layout.Architecture`, built once by a caller
            that merges many children (``m2n2 evolve``); by default built from the config.
        dtype: mergekit's ``dtype``: both parents are cast to it before merging (default:
            promoted per tensor, as mergekit does).
        out_dtype: mergekit's ``out_dtype``: the child is cast to it (default: the merge
            dtype) before it is cast to the model's dtype.
        io: ``"read"`` (positioned reads, the default) or ``"mmap"`` (``safe_open``).
        keep_buffers: keep the two scratch buffers (each the size of the largest tensor) with
            the model for its next merge (:func:`release_buffers` frees them), instead of
            allocating them afresh every time.

    Everything that can be checked (layout, names, shapes, parameters) is checked before the
    first tensor is written; an I/O error mid-way leaves the model partly overwritten.

    Returns:
        A :class:`ResidentChild`, for :func:`save_child`.
    """
    check_unit_interval("mix_ratio", mix_ratio)
    check_granularity(granularity)
    arch = arch or Architecture.for_config(cast("PretrainedConfig", model.config))
    params = model.state_dict()
    scratch_a, scratch_b = ({}, {}) if not keep_buffers else _SCRATCH.setdefault(model, ({}, {}))
    with Checkpoint(parent_a, io, scratch_a) as a, Checkpoint(parent_b, io, scratch_b) as b:
        plan = _plan(arch, a, b)
        used = plan.layout if layout is None else layout
        if used.names != plan.layout.names or dict(used.shapes) != dict(plan.layout.shapes):
            raise M2N2ConfigError(f"the layout given does not describe parent A ({a.path})")
        split = used.split_index(split_point, granularity)
        tied = {n: t for n, t in plan.tied.items() if n in params}
        _check_model_tensors(
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
                    split=split,
                    dtype=dtype,
                    out_dtype=out_dtype,
                    dest=dest,
                )
                dtypes[name] = written
                exact = exact and (
                    dest.dtype == written or dest.dtype in _HOLDS_EXACTLY.get(written, ())
                )
            for name, target in tied.items():
                if _storage(params[name]) != _storage(params[target]):
                    params[name].copy_(params[target])  # a model that does not share them
    return ResidentChild(
        parent_a=Path(parent_a),
        parent_b=Path(parent_b),
        mix_ratio=mix_ratio,
        split_point=split_point,
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
    split_point: float,
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
        split = plan.layout.split_index(split_point, granularity)
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
                    split=split,
                    dtype=dtype,
                    out_dtype=out_dtype,
                    dest=None,
                )
    return child


# --------------------------------------------------------------------------------------------
# Seeds in, children out.


def load_checkpoint_into_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    io: IO = "read",
) -> None:
    """Read a checkpoint's tensors into ``model`` in place, one tensor at a time.

    ``dtype`` (mergekit's ``dtype``, as a seed enters a merge) is applied before the cast to
    the model's dtype. A tensor the model ties to one already read (``lm_head`` and the
    embeddings) is read once. Every model parameter must be in the checkpoint.
    """
    params = model.state_dict()
    with Checkpoint(path, io) as ckpt:
        names: list[str] = []
        seen: set[int] = set()
        for name in ckpt.entries:
            if name not in params:
                raise M2N2Error(f"tensor {name!r} of {path} does not belong to the model")
        for name, tensor in params.items():  # the model's order: embeddings before lm_head
            if name in ckpt.entries and _storage(tensor) not in seen:
                seen.add(_storage(tensor))
                names.append(name)
        _check_model_tensors(
            params,
            model.named_parameters(remove_duplicate=False),
            names,
            {},
            ckpt.shapes,
            str(path),
        )
        with torch.no_grad():
            for name in names:
                ckpt.get(name, dtype=dtype, out=params[name])


def save_model_tensors(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    names: Mapping[str, torch.dtype | None] | Iterable[str] | None = None,
) -> None:
    """Write the model's current tensors to a safetensors file, atomically.

    ``names``: which tensors (default: the whole state dict), optionally mapped to the dtype to
    store each in. A tensor sharing storage with one already listed (a tied ``lm_head``) is
    left out. Tensors already in the right dtype are written from the model's own memory
    (safetensors serialises from the pointers): no copy of the model is made.
    """
    params = model.state_dict()
    wanted: Mapping[str, torch.dtype | None]
    if names is None:
        wanted = dict.fromkeys(params)
    elif isinstance(names, Mapping):
        wanted = names
    else:
        wanted = dict.fromkeys(names)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, store_as in wanted.items():
        if name not in params:
            raise M2N2Error(f"the model has no tensor {name!r}")
        tensor = params[name].detach()
        if _storage(tensor) in seen:
            continue
        seen.add(_storage(tensor))
        if store_as is not None and tensor.dtype != store_as:
            tensor = tensor.to(store_as)
        tensors[name] = tensor.cpu()
    save_tensors_atomic(tensors, Path(path))


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
