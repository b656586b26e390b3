"""The mergekit merge method ``m2n2``: M2N2's split-point SLERP over a whole model.

Two parents, A (``base_model``) and B. Think of each model as one flat vector of parameters,
laid out in the *architecture's order*: the pre-weights (embeddings), layers ``0 .. N-1``, then
the post-weights (final norm, ``lm_head``), each layer's tensors in the order of mergekit's
architecture definition, each tensor flattened row-major. ``split_point`` in [0, 1] is a
fraction of that vector: the first ``floor(split_point * n)`` parameters are mixed with
``t = mix_ratio`` (the weight on parent B), the rest with ``t = 1 - mix_ratio``. A split can
fall inside a tensor; that tensor is then cut elementwise, as in the paper. With
``granularity: layer`` the split moves to the nearest layer boundary instead, which makes the
method equal to mergekit's built-in ``slerp`` over two slices ``[0, k)`` (``t = w``) and
``[k, N)`` (``t = 1 - w``); the pre-weights always belong to the first part and the post-weights
to the second, as with slices.

Each tensor is interpolated with its own SLERP angle and falls back to linear interpolation
when ``|cos| > 0.9995``, exactly mergekit's ``slerp`` rule, via the shared kernel
:func:`m2n2_plugin.kernel.split_slerp`.

Why this module needs more than a kernel: a mergekit kernel sees one tensor and its name, and
tensors are merged in no particular order, yet the split index is global. So the layout (offset
and size of every tensor in the flat vector) is computed up front, from the checkpoint's shapes
(safetensors headers or the meta-loaded ``.bin`` index, never the weights) matched against
``ConfiguredModelArchitecture(...)``'s weights, and cached per pair of parents. The kernel finds
it through the ids of its inputs: a mergekit ``ModelReference`` on the ``mergekit-yaml`` path,
an :class:`InMemoryParent` carrying the layout on the in-memory path
(:func:`m2n2_merge_state_dicts`).

Counting rules, so that ``mergekit-yaml`` and the in-memory path count the same parameters:

* a tensor counts if mergekit writes it: weights of the architecture found in parent A's
  checkpoint under their name or an alias; optional weights that are absent (a tied ``lm_head``
  that ``save_pretrained`` did not store) count zero times, so tied embeddings count once;
* in memory, a state dict of a tied model holds ``lm_head.weight`` as well; an optional weight
  with ``tied_names`` is treated as absent when the config ties word embeddings or when it
  shares storage with its tie target, and comes back in the result as the merged target;
* tensors of the checkpoint that the architecture does not list (e.g. rotary buffers) are not
  merged by mergekit and do not count;
* if tokenizer alignment (``tokenizer_source`` / ``tokenizer``) resizes a vocabulary tensor, its
  place is still counted with parent A's shape and a split inside it falls at the same fraction
  of the resized tensor.

Errors a user can make are raised as :class:`M2N2ConfigError` before any tensor is merged, i.e.
before ``mergekit-yaml`` creates the output directory. It is a ``click.ClickException``, so
``mergekit-yaml`` prints one line (``Error: m2n2: ...``) and exits with status 1, no traceback.
The checks sit where mergekit validates a method's inputs (``MergeMethod.validate_inputs``,
called while planning) and in the parameter validators (run while parameters are resolved,
also while planning).
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from functools import cached_property
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

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.kernel import MERGEKIT_DOT_THRESHOLD
from m2n2_plugin.kernel import cosine
from m2n2_plugin.kernel import split_index
from m2n2_plugin.kernel import split_slerp

if TYPE_CHECKING:
    from mergekit.architecture import ModelArchitecture
    from mergekit.architecture import WeightInfo
    from transformers import PretrainedConfig

__all__ = [
    "GRANULARITIES",
    "InMemoryParent",
    "M2N2ConfigError",
    "METHOD_NAME",
    "ModelLayout",
    "architecture_tensor_names",
    "layout_for_model",
    "layout_for_state_dict",
    "m2n2_crossover",
    "m2n2_merge_method",
    "m2n2_merge_state_dicts",
    "register",
    "tensor_layout",
]

METHOD_NAME = "m2n2"
GRANULARITIES = ("element", "layer")


class M2N2ConfigError(click.ClickException, M2N2Error):
    """A merge that cannot be done as asked: bad parameters, wrong inputs, unequal parents.

    A ``click.ClickException`` so that ``mergekit-yaml`` (a click command) prints it as one line
    and exits with status 1, and an :class:`~m2n2_plugin.errors.M2N2Error` for the ``m2n2`` CLI.
    Deliberately not a ``ValueError``: pydantic turns a ``ValueError`` raised in a parameter
    validator into a multi-line ``ValidationError``.
    """

    def format_message(self) -> str:
        # What click prints after "Error: ". str(error) stays the bare message, so the m2n2
        # CLI's "m2n2: error: <message>" does not say m2n2 twice.
        return f"{METHOD_NAME}: {self.message}"


# --------------------------------------------------------------------------------------------
# Parameters. Validators run while mergekit resolves parameters (planning), so a bad value
# stops the merge before the output directory exists. Defaults of None make a missing value
# reach the validator too, instead of mergekit's multi-line "Missing required parameter".


def _unit_interval(name: str) -> Callable[[Any], float]:
    def validate(value: Any) -> float:
        if value is None:
            raise M2N2ConfigError(f"parameters.{name} is required: a number in [0, 1]")
        number = math.nan
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                pass
        if not 0.0 <= number <= 1.0:
            raise M2N2ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        return number

    return validate


def _granularity(value: Any) -> str:
    if value not in GRANULARITIES:
        raise M2N2ConfigError(f"granularity must be 'element' or 'layer', got {value!r}")
    return str(value)


MixRatio = Annotated[float | None, PlainValidator(_unit_interval("mix_ratio"))]
SplitPoint = Annotated[float | None, PlainValidator(_unit_interval("split_point"))]
Granularity = Annotated[str, PlainValidator(_granularity)]


# --------------------------------------------------------------------------------------------
# Layout: where each tensor sits in the flat parameter vector.


def tensor_layout(
    names_in_order: Sequence[str], numels: Mapping[str, int]
) -> dict[str, tuple[int, int]]:
    """``{name: (offset, numel)}`` for tensors concatenated in ``names_in_order``."""
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in names_in_order:
        if name in spans:
            raise ValueError(f"tensor {name!r} appears twice in the order")
        numel = int(numels[name])
        if numel < 0:
            raise ValueError(f"tensor {name!r} has a negative size")
        spans[name] = (offset, numel)
        offset += numel
    return spans


@dataclass(frozen=True)
class ModelLayout:
    """A model seen as one flat vector: each tensor's span, and the layer boundaries.

    Attributes:
        spans: ``{name: (offset, numel)}`` in the architecture's order (mergekit's names).
        shapes: each tensor's shape in the parent the layout was read from.
        boundaries: offsets where a layer starts, plus the offset after each module's last
            layer (``N + 1`` values for a one-module model with ``N`` layers).
        vocabulary_axes: ``{name: axis}`` for tensors indexed by token id.
    """

    spans: Mapping[str, tuple[int, int]]
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)
    boundaries: tuple[int, ...] = ()
    vocabulary_axes: Mapping[str, int] = field(default_factory=dict, repr=False)

    @cached_property
    def total(self) -> int:
        """Number of parameters counted."""
        return sum(numel for _, numel in self.spans.values())

    @property
    def names(self) -> list[str]:
        """Tensor names in the architecture's order."""
        return list(self.spans)

    def split_index(self, split_point: float, granularity: str = "element") -> int:
        """The global split index for ``split_point``: ``floor(split_point * total)``,
        moved to the nearest layer boundary (ties to the earlier one) for ``"layer"``."""
        split = split_index(split_point, self.total)
        if granularity == "element":
            return split
        if granularity != "layer":
            raise M2N2ConfigError(f"granularity must be 'element' or 'layer', got {granularity!r}")
        if not self.boundaries:
            raise M2N2ConfigError("granularity 'layer' needs an architecture with layers")
        return min(self.boundaries, key=lambda b: (abs(b - split), b))

    def local_split(self, name: str, split: int, numel: int | None = None) -> int:
        """Split index inside tensor ``name`` (0: all after the split; numel: all before).

        ``numel`` is the size of the tensor actually merged; when tokenizer alignment resized
        it, the split keeps its fraction of the tensor.
        """
        offset, counted = self.spans[name]
        numel = counted if numel is None else numel
        inside = split - offset
        if inside <= 0:
            return 0
        if inside >= counted:
            return numel
        if numel == counted:
            return inside
        return (inside * numel) // counted


@dataclass(frozen=True)
class _Segment:
    """A run of weights: a module's pre-weights, one of its layers, or its post-weights."""

    kind: str  # "pre", "layer" or "post"
    weights: tuple[WeightInfo, ...]


@dataclass(frozen=True)
class _Slot:
    """A weight of the architecture as found in one parent."""

    name: str  # mergekit's (output) name
    source: str | None  # the key holding it in the parent; None: mergekit must convert it
    segment: int


def _architecture_segments(arch: ModelArchitecture, config: PretrainedConfig) -> list[_Segment]:
    """The architecture's weights in mergekit's order (``ModelArchitecture.all_weights``),
    grouped so that layer boundaries are known."""
    from mergekit.architecture import ConfiguredModelArchitecture

    configured = ConfiguredModelArchitecture(info=arch, config=config)
    segments: list[_Segment] = []
    for module_name in arch.modules:
        module = configured.get_module(module_name)
        segments.append(_Segment("pre", tuple(module.pre_weights())))
        for index in range(module.num_layers()):
            segments.append(_Segment("layer", tuple(module.layer_weights(index) or ())))
        segments.append(_Segment("post", tuple(module.post_weights())))
    return segments


def _resolve_slots(
    segments: Sequence[_Segment],
    available: Collection[str],
    is_tied: Callable[[WeightInfo, str], bool] | None = None,
) -> tuple[list[_Slot], dict[str, str]]:
    """Match the architecture's weights to the keys of one parent, as mergekit does.

    Returns the slots that count and ``{tied weight: its target}`` for optional weights that
    ``is_tied`` reports as tied (they are not merged nor counted). Absent optional weights
    are skipped (mergekit skips them too); absent required ones get ``source=None``.
    """
    slots: list[_Slot] = []
    tied: dict[str, str] = {}
    for index, segment in enumerate(segments):
        for weight in segment.weights:
            source = next(
                (n for n in (weight.name, *(weight.aliases or ())) if n in available), None
            )
            if source is None and weight.optional:
                continue
            if source is not None and weight.optional and weight.tied_names and is_tied:
                target = next((t for t in weight.tied_names if t in available), None)
                if target is not None and is_tied(weight, target):
                    tied[weight.name] = target
                    continue
            slots.append(_Slot(weight.name, source, index))
    return slots, tied


def _build_layout(
    segments: Sequence[_Segment],
    slots: Sequence[_Slot],
    shapes: Mapping[str, tuple[int, ...]],
) -> ModelLayout:
    names = [slot.name for slot in slots]
    spans = tensor_layout(names, {name: math.prod(shapes[name]) for name in names})
    # Boundaries: where each layer segment starts, and where each module's post-weights start.
    start_of = {}
    offset = 0
    by_segment: dict[int, int] = defaultdict(int)
    for slot in slots:
        by_segment[slot.segment] += spans[slot.name][1]
    for index in range(len(segments)):
        start_of[index] = offset
        offset += by_segment[index]
    boundaries = sorted(
        {start_of[i] for i, segment in enumerate(segments) if segment.kind in ("layer", "post")}
    )
    vocab: dict[str, int] = {}
    for segment in segments:
        for weight in segment.weights:
            if weight.name in spans and weight.vocabulary_axis is not None:
                vocab[weight.name] = weight.vocabulary_axis
    return ModelLayout(
        spans=spans,
        shapes={name: tuple(shapes[name]) for name in names},
        boundaries=tuple(boundaries) if any(s.kind == "layer" for s in segments) else (),
        vocabulary_axes=vocab,
    )


def _architecture_for_config(config: PretrainedConfig) -> ModelArchitecture:
    """mergekit's architecture for a config; if it names none (a config built in code has
    ``architectures=None`` until the model is saved), the causal LM of its ``model_type``."""
    from mergekit.architecture import arch_info_for_config

    if not getattr(config, "architectures", None):
        from mergekit.architecture.json_definitions import NAME_TO_ARCH

        model_type = getattr(config, "model_type", None)
        candidates = {
            id(arch): arch
            for archs in NAME_TO_ARCH.values()
            for arch in archs
            if arch.expected_model_type == model_type
        }
        if len(candidates) > 1:  # e.g. llama: ...ForCausalLM and ...ForSequenceClassification
            candidates = {
                key: arch
                for key, arch in candidates.items()
                if any(name.endswith("ForCausalLM") for name in arch.architectures)
            }
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        raise M2N2ConfigError(
            "the config names no architecture (config.architectures is empty); set it, "
            "e.g. to ['LlamaForCausalLM']"
        )
    try:
        arch = arch_info_for_config(config)
    except RuntimeError as exc:
        raise M2N2ConfigError(str(exc)) from None
    if arch is None:
        raise M2N2ConfigError(
            f"mergekit has no architecture definition for {(config.architectures or ['?'])[0]}"
        )
    return arch


def _ties_embeddings(config: PretrainedConfig) -> bool:
    value = getattr(config, "tie_word_embeddings", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "tie_word_embeddings", None)
    return bool(value)


def architecture_tensor_names(
    config: PretrainedConfig | str | os.PathLike[str],
    available: Collection[str] | None = None,
) -> list[str]:
    """The tensor names of a model in the architecture's order, as ``m2n2`` counts them.

    Args:
        config: a transformers config, or a model directory (or hub id, read through mergekit)
            whose checkpoint then decides which optional weights exist.
        available: the keys of a checkpoint or state dict, to drop absent optional weights and
            resolve aliases. Without it (and with a config), all weights are listed except an
            optional tied weight when the config ties word embeddings.
    """
    if isinstance(config, (str, os.PathLike)):
        from mergekit.common import ModelReference

        reference = ModelReference.parse(os.fspath(config))
        return layout_for_model(reference).names
    segments = _architecture_segments(_architecture_for_config(config), config)
    if available is None:
        tie = _ties_embeddings(config)
        names: list[str] = []
        for segment in segments:
            for weight in segment.weights:
                if not (weight.optional and weight.tied_names and tie):
                    names.append(weight.name)
        return names
    slots, _ = _resolve_slots(segments, available, lambda w, t: _ties_embeddings(config))
    return [slot.name for slot in slots]


# --------------------------------------------------------------------------------------------
# Layout of a checkpoint (the mergekit-yaml path): shapes from headers, never the weights.


def _checkpoint_shapes(reference: Any, slots: Sequence[_Slot]) -> dict[str, tuple[int, ...]]:
    import safetensors
    from mergekit.io.tasks import LoaderCache
    from mergekit.io.tasks import LoadTensor

    index = LoaderCache().get(reference).index
    by_shard: dict[str, list[_Slot]] = defaultdict(list)
    shapes: dict[str, tuple[int, ...]] = {}
    for slot in slots:
        if slot.source is None:
            # Stored under another layout (mergekit converts it on load): load it for its shape.
            tensor = LoadTensor(model=reference, tensor=slot.name, optional=True).execute()
            if tensor is None:
                raise M2N2ConfigError(f"{reference} has no tensor {slot.name}")
            shapes[slot.name] = tuple(tensor.shape)
        else:
            by_shard[index.tensor_paths[slot.source]].append(slot)
    for shard, shard_slots in by_shard.items():
        path = os.path.join(index.base_path, shard)
        if path.lower().endswith(".safetensors"):
            with safetensors.safe_open(path, framework="pt") as reader:
                for slot in shard_slots:
                    shapes[slot.name] = tuple(reader.get_slice(slot.source).get_shape())
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            state = state.get("state_dict", state)
            for slot in shard_slots:
                shapes[slot.name] = tuple(state[slot.source].shape)
    return shapes


def _reference_architecture(
    reference: Any, config: PretrainedConfig, others: Sequence[Any]
) -> ModelArchitecture:
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    arch = arch_info_for_config(config)
    if arch is None:  # no JSON definition: infer it from the checkpoints, as mergekit does
        from mergekit.architecture.auto import infer_architecture_info
        from mergekit.options import MergeOptions

        options = MergeOptions(
            trust_remote_code=cache.trust_remote_code,
            transformers_cache=cache.hf_cache_dir,
            lazy_unpickle=cache.lazy_unpickle,
        )
        arch = infer_architecture_info(tuple(others) or (reference,), reference, options)
    return arch


def layout_for_model(reference: Any, *, others: Sequence[Any] = ()) -> ModelLayout:
    """The layout of a checkpoint (a mergekit ``ModelReference``), from its tensor shapes.

    Uses mergekit's loader cache (set up by ``run_merge``), so LoRA references and mergekit's
    options are honoured. ``others`` are the other models of the merge, only needed to infer an
    architecture mergekit has no definition for.
    """
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    config = reference.config(trust_remote_code=cache.trust_remote_code)
    arch = _reference_architecture(reference, config, others)
    segments = _architecture_segments(arch, config)
    available = cache.get(reference).index.tensor_paths
    slots, _ = _resolve_slots(segments, available)
    return _build_layout(segments, slots, _checkpoint_shapes(reference, slots))


def _compare_layouts(
    layout_a: ModelLayout,
    layout_b: ModelLayout,
    label_a: str,
    label_b: str,
    *,
    allow_vocabulary: bool,
) -> None:
    """Raise if the parents do not have the same tensors with the same shapes.

    With ``allow_vocabulary``, tensors indexed by token id may differ along that axis only
    (mergekit's tokenizer alignment resizes them; without it, mergekit rejects the merge).
    """
    only_a = [n for n in layout_a.spans if n not in layout_b.spans]
    only_b = [n for n in layout_b.spans if n not in layout_a.spans]
    if only_a or only_b:
        name, where = (only_a[0], label_a) if only_a else (only_b[0], label_b)
        raise M2N2ConfigError(
            f"the parents have different tensors: {name} is only in {where} "
            f"({len(only_a) + len(only_b)} such tensors); M2N2 needs two models of one "
            "architecture and size"
        )
    for name, shape_a in layout_a.shapes.items():
        shape_b = layout_b.shapes[name]
        if shape_a == shape_b:
            continue
        axis = layout_a.vocabulary_axes.get(name)
        if (
            allow_vocabulary
            and axis is not None
            and len(shape_a) == len(shape_b)
            and all(
                x == y for i, (x, y) in enumerate(zip(shape_a, shape_b, strict=True)) if i != axis
            )
        ):
            continue
        raise M2N2ConfigError(
            f"the parents have different shapes: {name} is {tuple(shape_a)} in {label_a} "
            f"and {tuple(shape_b)} in {label_b}; M2N2 needs two models of one architecture "
            "and size"
        )


_PAIR_LAYOUTS: dict[tuple[Hashable, Hashable], ModelLayout] = {}
_PAIR_LOCK = threading.Lock()


def _pair_layout(base: Any, other: Any, *, refresh: bool = False) -> ModelLayout:
    """Parent A's layout after checking that B matches it; cached per pair of references.

    ``refresh`` re-reads the checkpoints: done once per merge, when mergekit validates the
    slice, so a long-lived process that rewrites a model folder never merges with a stale
    layout; the per-tensor calls that follow hit the cache.
    """
    key = (base, other)
    with _PAIR_LOCK:
        cached = None if refresh else _PAIR_LAYOUTS.get(key)
    if cached is not None:
        return cached
    layout_a = layout_for_model(base, others=(base, other))
    layout_b = layout_for_model(other, others=(base, other))
    _compare_layouts(
        layout_a,
        layout_b,
        f"parent A ({base})",
        f"parent B ({other})",
        allow_vocabulary=True,
    )
    with _PAIR_LOCK:
        _PAIR_LAYOUTS[key] = layout_a
    return layout_a


# --------------------------------------------------------------------------------------------
# Layout of an in-memory state dict.


@dataclass(frozen=True, eq=False)
class InMemoryParent:
    """The input id of a parent given as a state dict: carries the layout to the kernel.

    mergekit hands a kernel its inputs' ids; on the ``mergekit-yaml`` path these are model
    references (the layout is read from their checkpoints), in memory there is nothing to read,
    so the id brings the layout along. Hashed by identity.
    """

    label: str
    layout: ModelLayout = field(repr=False)

    def __str__(self) -> str:
        return self.label


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta or exotic tensors
        return False


def _state_dict_slots(
    state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig
) -> tuple[list[_Segment], list[_Slot], dict[str, str]]:
    segments = _architecture_segments(_architecture_for_config(config), config)
    ties = _ties_embeddings(config)

    def is_tied(weight: WeightInfo, target: str) -> bool:
        source = next(n for n in (weight.name, *(weight.aliases or ())) if n in state_dict)
        return ties or _shares_storage(state_dict[source], state_dict[target])

    slots, tied = _resolve_slots(segments, state_dict, is_tied)
    missing = [slot.name for slot in slots if slot.source is None]
    if missing:
        raise M2N2ConfigError(
            f"the state dict has no tensor {missing[0]} ({len(missing)} missing tensors)"
        )
    return segments, slots, tied


def layout_for_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: PretrainedConfig
) -> ModelLayout:
    """The layout of a state dict of a model described by ``config`` (see module docs)."""
    segments, slots, _ = _state_dict_slots(state_dict, config)
    shapes = {slot.name: tuple(state_dict[slot.source].shape) for slot in slots if slot.source}
    return _build_layout(segments, slots, shapes)


# --------------------------------------------------------------------------------------------
# The math and the method.


def m2n2_crossover(
    a: torch.Tensor, b: torch.Tensor, mix_ratio: float, split_at: int
) -> torch.Tensor:
    """Split-point SLERP of one tensor, mergekit style (own angle, lerp if |cos| > 0.9995).

    Identical tensors come back bit-for-bit: SLERP of a vector with itself is that vector, but
    the linear fallback ``(1 - t) x + t x`` can be an ulp off in float32.
    """
    cos = cosine(a, b)
    if cos > MERGEKIT_DOT_THRESHOLD and torch.equal(a, b):
        return a.clone()
    return split_slerp(a, b, mix_ratio, split_at, cos=cos, dot_threshold=MERGEKIT_DOT_THRESHOLD)


def _group_layout(base_id: Hashable, other_id: Hashable, *, refresh: bool = False) -> ModelLayout:
    if isinstance(base_id, InMemoryParent):
        return base_id.layout
    from mergekit.common import ModelReference

    if isinstance(base_id, ModelReference) and isinstance(other_id, ModelReference):
        return _pair_layout(base_id, other_id, refresh=refresh)
    raise M2N2ConfigError(
        "the merge needs the models' layout: merge checkpoints with mergekit-yaml / run_merge, "
        "or state dicts with m2n2_plugin.merge_method.m2n2_merge_state_dicts"
    )


_SLICE_LABEL = re.compile(r"\.slices\[(\d+)\]$")


class M2N2MergeMethod(FunctionalGroupMergeMethod):
    """mergekit's group method plus the up-front checks M2N2 needs.

    mergekit calls ``validate_inputs`` while planning: once per output slice (ids = the slice's
    models) and once per output tensor (``group_name`` = its name), before any tensor is loaded
    or the output directory exists. That is where the pair is checked (two models, a base,
    equal tensors and shapes) and the layout computed and cached.
    """

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
        ids = list(input_ids)
        if len(ids) != 2:
            names = ", ".join(str(i) for i in ids)
            raise M2N2ConfigError(
                f"expects exactly two models, parent A (base_model) and parent B; got {len(ids)}"
                + (f": {names}" if names else "")
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
        layout = _group_layout(base_id, other_id, refresh=match is not None)
        if group_name and not match and group_name not in layout.spans:
            raise M2N2ConfigError(
                f"tensor {group_name} is not part of parent A ({base_id}); m2n2 merges whole "
                "models listed under `models:`"
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
) -> torch.Tensor:
    """Merge one tensor: find its span in parent A's layout, cut it at the global split."""
    base = group.base
    if base is None or len(group.non_base) != 1:
        raise M2N2ConfigError("needs parent A (base_model) and one other model")
    other = group.non_base[0]
    name = group.metadata.name
    if name is None:
        raise M2N2ConfigError("mergekit gave a tensor without a name")
    if mix_ratio is None or split_point is None:  # unreachable: the validators reject None
        raise M2N2ConfigError("mix_ratio and split_point are required")
    layout = _group_layout(base.id, other.id)
    split = layout.split_index(split_point, granularity)
    local = layout.local_split(name, split, base.tensor.numel())
    return m2n2_crossover(base.tensor, other.tensor, mix_ratio, local)


# --------------------------------------------------------------------------------------------
# In memory.


def m2n2_merge_state_dicts(
    parent_a: Mapping[str, torch.Tensor],
    parent_b: Mapping[str, torch.Tensor],
    *,
    mix_ratio: float,
    split_point: float,
    config: PretrainedConfig,
    granularity: str = "element",
) -> dict[str, torch.Tensor]:
    """Merge two state dicts exactly as ``mergekit-yaml`` with ``merge_method: m2n2`` would.

    Runs mergekit's own ``merge_state_dicts`` with the ``m2n2`` method; the layout travels in
    the input ids (:class:`InMemoryParent`). ``config`` is the parents' transformers config; it
    selects mergekit's architecture (the order of the tensors) and says whether embeddings are
    tied. The result has mergekit's tensor names, in the architecture's order; a tied weight
    (e.g. ``lm_head.weight`` of a tied model) maps to the merged tensor it is tied to. Tensors
    the architecture does not list are left out, as ``mergekit-yaml`` leaves them out.
    """
    only_a = sorted(set(parent_a) - set(parent_b))
    only_b = sorted(set(parent_b) - set(parent_a))
    if only_a or only_b:
        name, where = (only_a[0], "parent A") if only_a else (only_b[0], "parent B")
        raise M2N2ConfigError(
            f"the parents have different tensors: {name} is only in {where} "
            f"({len(only_a) + len(only_b)} such tensors); M2N2 needs two models of one "
            "architecture and size"
        )
    segments, slots_a, tied = _state_dict_slots(parent_a, config)
    _, slots_b, _ = _state_dict_slots(parent_b, config)
    shapes_a = {s.name: tuple(parent_a[s.source].shape) for s in slots_a if s.source}
    shapes_b = {s.name: tuple(parent_b[s.source].shape) for s in slots_b if s.source}
    layout = _build_layout(segments, slots_a, shapes_a)
    layout_b = _build_layout(segments, slots_b, shapes_b)
    _compare_layouts(layout, layout_b, "parent A", "parent B", allow_vocabulary=False)
    id_a = InMemoryParent("parent_a", layout)
    id_b = InMemoryParent("parent_b", layout)
    inputs = {
        id_a: {s.name: parent_a[s.source] for s in slots_a if s.source},
        id_b: {s.name: parent_b[s.source] for s in slots_b if s.source},
    }
    parameters = {"mix_ratio": mix_ratio, "split_point": split_point, "granularity": granularity}
    with torch.no_grad():
        merged = merge_state_dicts(inputs, m2n2_merge_method, parameters=parameters, base=id_a)
    for name, target in tied.items():
        merged[name] = merged[target]
    return merged


# --------------------------------------------------------------------------------------------
# Registration.

_REGISTER_LOCK = threading.Lock()


def register() -> MergeMethod:
    """Register ``m2n2`` with mergekit; idempotent, returns the registered method.

    A second call (or a second copy of this module, e.g. after ``importlib.reload``) finds the
    name taken and leaves mergekit's registry alone: mergekit raises on duplicate names.
    """
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
