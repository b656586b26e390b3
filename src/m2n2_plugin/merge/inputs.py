r"""The two inputs of an ``m2n2`` merge as mergekit hands them over: ids, and their layouts.

mergekit gives the merge method's kernel one tensor and its inputs' ids, yet the split index is
global: the kernel finds the pair's layout through the ids (:class:`PairLayouts`). On the
``mergekit-yaml`` path the ids are model references: their architecture and tensor shapes are
read here through mergekit's own loader (so LoRA references, ``.bin`` shards and mergekit's
options are honoured) and the pair is checked and planned by
:func:`m2n2_plugin.layout.plan_pair` like every other pair. In memory an
:class:`InMemoryParent` id carries the layout itself.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Collection
from collections.abc import Hashable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.merge.checkpoint import checkpoint_shapes
from m2n2_plugin.merge.layout import Architecture
from m2n2_plugin.merge.layout import ModelLayout
from m2n2_plugin.merge.layout import Parent
from m2n2_plugin.merge.layout import architecture_for_config
from m2n2_plugin.merge.layout import architecture_segments
from m2n2_plugin.merge.layout import parent_layout
from m2n2_plugin.merge.layout import plan_pair
from m2n2_plugin.merge.layout import resolve_slots
from m2n2_plugin.merge.layout import ties_embeddings

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def reference_architecture(reference: Any, others: Sequence[Any] = ()) -> Architecture:
    """The architecture of a mergekit ``ModelReference`` (through mergekit's loader cache, so
    LoRA references and mergekit's options are honoured). ``others`` are the other models of
    the merge, only needed to infer an architecture mergekit has no definition for."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    config = reference.config(trust_remote_code=cache.trust_remote_code)
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
    return Architecture(tuple(architecture_segments(arch, config)), ties=False)


def reference_parent(reference: Any, label: str) -> Parent:
    """A mergekit ``ModelReference`` as a :class:`Parent`: shapes from the safetensors headers
    (or the meta-loaded ``.bin`` shards), never the weights."""
    import torch
    from mergekit.io.tasks import LoaderCache
    from mergekit.io.tasks import LoadTensor

    index = LoaderCache().get(reference).index
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(index.tensor_paths.values())):
        path = Path(index.base_path) / shard
        if path.name.lower().endswith(".safetensors"):
            shapes.update(checkpoint_shapes(path))
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            state = state.get("state_dict", state)
            shapes.update((k, tuple(v.shape)) for k, v in state.items() if hasattr(v, "shape"))
    shapes = {key: shapes[key] for key in index.tensor_paths if key in shapes}

    def converted_shape(name: str) -> tuple[int, ...]:
        # Stored under another layout (mergekit converts it on load): load it for its shape.
        tensor = LoadTensor(model=reference, tensor=name, optional=True).execute()
        if tensor is None:
            raise M2N2ConfigError(f"{reference} has no tensor {name}")
        return tuple(tensor.shape)

    return Parent(
        label, shapes, is_tied=lambda key, target: False, converted_shape=converted_shape
    )


def plan_references(base: Any, other: Any) -> ModelLayout:
    """Parent A's layout for a merge of two mergekit references, after checking the pair.

    Vocabulary tensors may differ along the token axis: mergekit's tokenizer alignment
    (``tokenizer_source``) resizes them before they are merged.
    """
    arch = reference_architecture(base, (base, other))
    a = reference_parent(base, f"parent A ({base})")
    b = reference_parent(other, f"parent B ({other})")
    return plan_pair(arch, a, b, allow_vocabulary=True).layout


def layout_for_model(reference: Any, *, others: Sequence[Any] = ()) -> ModelLayout:
    """The layout of a checkpoint given as a mergekit ``ModelReference``."""
    arch = reference_architecture(reference, others)
    return parent_layout(arch, reference_parent(reference, str(reference)))[0]


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
    segments = architecture_segments(architecture_for_config(config), config)
    if available is None:
        tie = ties_embeddings(config)
        names: list[str] = []
        for segment in segments:
            for weight in segment.weights:
                if not (weight.optional and weight.tied_names and tie):
                    names.append(weight.name)
        return names
    slots, _ = resolve_slots(segments, available, lambda w, t: ties_embeddings(config))
    return [slot.name for slot in slots]


@dataclass(frozen=True, eq=False)
class InMemoryParent:
    """The input id of a parent given as a state dict: carries the layout to the kernel.

    On the ``mergekit-yaml`` path the ids are model references whose checkpoints hold the
    layout; in memory there is nothing to read, so the id brings it along. Hashed by identity.
    """

    label: str
    layout: ModelLayout = field(repr=False)

    def __str__(self) -> str:
        return self.label


class PairLayouts:
    """Parent A's layout for a pair of input ids: an :class:`InMemoryParent` carries it; for
    model references, the layouts of the pairs planned last are kept (a long-lived process
    merges many pairs; ``size`` bounds what is kept). Thread-safe: mergekit may plan in threads.
    """

    def __init__(self, size: int = 16) -> None:
        self._layouts: OrderedDict[tuple[Hashable, Hashable], ModelLayout] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def layout(self, base_id: Hashable, other_id: Hashable, *, plan: bool = False) -> ModelLayout:
        """The pair's layout; ``plan``: check the pair and plan it anew (a rewritten model
        folder is never merged with a stale layout)."""
        if isinstance(base_id, InMemoryParent):
            return base_id.layout
        with self._lock:
            known = None if plan else self._layouts.get((base_id, other_id))
        if known is not None:
            return known
        from mergekit.common import ModelReference

        if not (isinstance(base_id, ModelReference) and isinstance(other_id, ModelReference)):
            raise M2N2ConfigError(
                "the merge needs the models' layout: merge checkpoints with mergekit-yaml / "
                "run_merge, or state dicts with m2n2_plugin.merge_method.m2n2_merge_state_dicts"
            )
        layout = plan_references(base_id, other_id)
        with self._lock:
            self._layouts[(base_id, other_id)] = layout
            while len(self._layouts) > self._size:
                self._layouts.popitem(last=False)
        return layout
