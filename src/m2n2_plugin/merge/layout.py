"""Where each tensor sits in a model seen as one flat vector, and where a split falls.

M2N2 cuts a model's parameters at ONE global index, so every merge path (``mergekit-yaml``, two
state dicts in memory, the resident merge of ``m2n2 evolve``) needs the same answer to "which
tensors count, in which order, how big". It is computed here from ``{name: shape}`` (safetensors
headers via :func:`m2n2_plugin.checkpoint.read_header`, a state dict, or a mergekit model
reference: :mod:`m2n2_plugin.merge.inputs`) and mergekit's architecture (:class:`Architecture`,
the costly part: build it once), in the order mergekit writes tensors: pre-weights (embeddings),
layers ``0 .. N-1``, post-weights (final norm, ``lm_head``), each tensor flattened row-major.
:func:`plan_pair` checks that two parents can be merged and returns the :class:`PairPlan`.

Counting rules, so that every path counts the same parameters: a tensor counts if mergekit
writes it (a weight of the architecture found in parent A under its name or an alias); an absent
optional weight (a tied ``lm_head`` that ``save_pretrained`` did not store) and an optional weight
reported as tied (a config that ties word embeddings, a state dict whose ``lm_head`` shares
storage with the embeddings) do not count, so tied embeddings count once; tensors the
architecture does not list (rotary buffers) do not count; a vocabulary tensor resized by
tokenizer alignment is counted with parent A's shape, a split inside it at the same fraction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from functools import cached_property
from typing import TYPE_CHECKING
from typing import Any

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.merge.kernel import check_granularity
from m2n2_plugin.merge.kernel import split_index

if TYPE_CHECKING:
    from mergekit.architecture import ModelArchitecture
    from mergekit.architecture import WeightInfo
    from transformers import PretrainedConfig

Shapes = Mapping[str, tuple[int, ...]]
# --------------------------------------------------------------------------------------------
# The flat vector.


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
        check_granularity(granularity)
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


def split_indices(
    layout: ModelLayout, split_point: float | Sequence[float], granularity: str = "element"
) -> list[int]:
    """The global split index of each split point (one, or several that alternate the ratio)."""
    points = split_point if isinstance(split_point, Sequence) else [split_point]
    return [layout.split_index(point, granularity) for point in points]


@dataclass(frozen=True)
class Segment:
    """A run of weights: a module's pre-weights, one of its layers, or its post-weights."""

    kind: str  # "pre", "layer" or "post"
    weights: tuple[WeightInfo, ...]


@dataclass(frozen=True)
class Slot:
    """A weight of the architecture as found in one parent."""

    name: str  # mergekit's (output) name
    source: str | None  # the key holding it in the parent; None: mergekit must convert it
    segment: int


def architecture_segments(arch: ModelArchitecture, config: PretrainedConfig) -> list[Segment]:
    """The architecture's weights in mergekit's order (``ModelArchitecture.all_weights``),
    grouped so that layer boundaries are known."""
    from mergekit.architecture import ConfiguredModelArchitecture

    configured = ConfiguredModelArchitecture(info=arch, config=config)
    segments: list[Segment] = []
    for module_name in arch.modules:
        module = configured.get_module(module_name)
        segments.append(Segment("pre", tuple(module.pre_weights())))
        for index in range(module.num_layers()):
            segments.append(Segment("layer", tuple(module.layer_weights(index) or ())))
        segments.append(Segment("post", tuple(module.post_weights())))
    return segments


def resolve_slots(
    segments: Sequence[Segment],
    available: Collection[str],
    is_tied: Callable[[WeightInfo, str], bool] | None = None,
) -> tuple[list[Slot], dict[str, str]]:
    """Match the architecture's weights to the keys of one parent, as mergekit does.

    Returns the slots that count and ``{tied weight: its target}`` for optional weights that
    ``is_tied`` reports as tied (they are not merged nor counted). Absent optional weights
    are skipped (mergekit skips them too); absent required ones get ``source=None``.
    """
    slots: list[Slot] = []
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
            slots.append(Slot(weight.name, source, index))
    return slots, tied


def build_layout(
    segments: Sequence[Segment],
    slots: Sequence[Slot],
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


def architecture_for_config(config: PretrainedConfig) -> ModelArchitecture:
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


def ties_embeddings(config: PretrainedConfig) -> bool:
    value = getattr(config, "tie_word_embeddings", None)
    if value is None and hasattr(config, "get_text_config"):
        value = getattr(config.get_text_config(), "tie_word_embeddings", None)
    return bool(value)


def _same_names(
    names_a: Sequence[str], names_b: Sequence[str], label_a: str, label_b: str
) -> None:
    set_a, set_b = set(names_a), set(names_b)
    only_a = [n for n in names_a if n not in set_b]
    only_b = [n for n in names_b if n not in set_a]
    if only_a or only_b:
        name, where = (only_a[0], label_a) if only_a else (only_b[0], label_b)
        raise M2N2ConfigError(
            f"the parents have different tensors: {name} is only in {where} "
            f"({len(only_a) + len(only_b)} such tensors); M2N2 needs two models of one "
            "architecture and size"
        )


def compare_layouts(
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
    _same_names(list(layout_a.spans), list(layout_b.spans), label_a, label_b)
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


@dataclass(frozen=True)
class Architecture:
    """mergekit's architecture for one config, grouped into segments; build it once per run.

    ``ties``: whether the config ties word embeddings (an optional tied weight such as
    ``lm_head`` is then not counted, even where a file stores it).
    """

    segments: tuple[Segment, ...]
    ties: bool

    @classmethod
    def for_config(cls, config: PretrainedConfig) -> Architecture:
        """The architecture of a transformers config (see :func:`architecture_for_config`)."""
        arch = architecture_for_config(config)
        return cls(tuple(architecture_segments(arch, config)), ties_embeddings(config))


@dataclass(frozen=True)
class PairPlan:
    """Two parents checked against each other: parent A's layout and where each tensor is.

    Attributes:
        layout: parent A's layout (the split index is counted in it).
        sources_a, sources_b: per counted tensor (mergekit's name), its key in each parent.
        tied: tied weight -> the weight it is tied to (mergekit's names); not merged.
    """

    layout: ModelLayout
    sources_a: Mapping[str, str]
    sources_b: Mapping[str, str]
    tied: Mapping[str, str]


@dataclass(frozen=True)
class Parent:
    """One parent as :func:`plan_pair` needs it: a label for errors and its tensor shapes.

    Attributes:
        label: how errors name it, e.g. ``parent A (path/to/model)``.
        shapes: ``{key: shape}`` of every tensor the parent holds.
        is_tied: reports an optional tied weight (found under the given key) as tied to the
            target key even where the architecture's ``ties`` does not say so.
        converted_shape: the shape of a required weight held under no name or alias (mergekit
            converts it when loading); None: such a weight is an error.
    """

    label: str
    shapes: Shapes
    is_tied: Callable[[str, str], bool] | None = None
    converted_shape: Callable[[str], tuple[int, ...]] | None = None


def parent_layout(arch: Architecture, parent: Parent) -> tuple[ModelLayout, list[Slot], dict]:
    def is_tied(weight: WeightInfo, target: str) -> bool:
        if arch.ties or parent.is_tied is None:
            return arch.ties
        source = next(n for n in (weight.name, *(weight.aliases or ())) if n in parent.shapes)
        return parent.is_tied(source, target)

    slots, tied = resolve_slots(arch.segments, parent.shapes, is_tied)
    missing = [slot.name for slot in slots if slot.source is None]
    shapes: dict[str, tuple[int, ...]] = {}
    for slot in slots:
        if slot.source is not None:
            shapes[slot.name] = tuple(parent.shapes[slot.source])
        elif parent.converted_shape is not None:
            shapes[slot.name] = parent.converted_shape(slot.name)
        else:
            raise M2N2ConfigError(
                f"{parent.label} has no tensor {missing[0]} under its name or an alias "
                f"({len(missing)} such tensors)"
            )
    return build_layout(arch.segments, slots, shapes), slots, tied


def plan_pair(
    arch: Architecture,
    a: Parent,
    b: Parent,
    *,
    allow_vocabulary: bool = False,
    same_keys: bool = False,
) -> PairPlan:
    """Check that parents A and B can be merged and say how: the one compatibility check.

    Both must have the same counted tensors with the same shapes; with ``allow_vocabulary``,
    tensors indexed by token id may differ along that axis (mergekit's tokenizer alignment
    resizes them); with ``same_keys`` they must also hold the same keys, counted or not (two
    state dicts: a deeper model's extra layers are not in a shallower config's architecture).
    Raises :class:`M2N2ConfigError` naming the first difference.
    """
    if same_keys:
        _same_names(sorted(a.shapes), sorted(b.shapes), a.label, b.label)
    layout, slots_a, tied = parent_layout(arch, a)
    layout_b, slots_b, _ = parent_layout(arch, b)
    compare_layouts(layout, layout_b, a.label, b.label, allow_vocabulary=allow_vocabulary)
    return PairPlan(
        layout=layout,
        sources_a={s.name: str(s.source or s.name) for s in slots_a},
        sources_b={s.name: str(s.source or s.name) for s in slots_b},
        tied=tied,
    )


def _shares_storage(a: Any, b: Any) -> bool:
    try:
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # meta or exotic tensors
        return False


def state_dict_parent(state_dict: Mapping[str, Any], label: str) -> Parent:
    """A state dict as a :class:`Parent`: ``state_dict()`` of a tied model lists ``lm_head``
    as well, sharing storage with the embeddings; it is then reported as tied."""
    return Parent(
        label,
        {key: tuple(tensor.shape) for key, tensor in state_dict.items()},
        is_tied=lambda key, target: _shares_storage(state_dict[key], state_dict[target]),
    )


def layout_for_state_dict(state_dict: Mapping[str, Any], config: PretrainedConfig) -> ModelLayout:
    """The layout of a state dict of a model described by ``config`` (see module docs)."""
    arch = Architecture.for_config(config)
    return parent_layout(arch, state_dict_parent(state_dict, "the state dict"))[0]
