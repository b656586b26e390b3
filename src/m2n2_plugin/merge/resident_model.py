"""The resident model: built once without a random init, read into, saved from, in place.

``m2n2 evolve`` scores every seed and child on one Hugging Face model that lives on its device
for the whole run. This module makes that model (:func:`build_resident_model`), reads a
checkpoint's tensors into it one at a time (:func:`load_checkpoint_into_model`: a seed or an
archive member) and writes its current tensors to a safetensors file
(:func:`save_model_tensors`), checking first that the names cover every parameter. Merging a
child straight into it is :mod:`m2n2_plugin.merge.resident`.

Tied weights (``lm_head`` tied to the embeddings) share one storage in the model: they are read
and written once, and told apart by :func:`storage_id`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.checkpoint import IO
from m2n2_plugin.merge.checkpoint import Checkpoint
from m2n2_plugin.merge.models import save_tensors_atomic

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def storage_id(tensor: torch.Tensor) -> int:
    """The address of the tensor's storage: tied tensors share it."""
    return tensor.untyped_storage().data_ptr()


def on_cuda(model: torch.nn.Module) -> bool:
    """Whether the model's tensors live on a CUDA GPU (then host buffers are page-locked)."""
    first = next(iter(model.parameters()), None)
    return first is not None and first.device.type == "cuda"


def check_model_tensors(
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
    covered = {storage_id(params[name]) for name in (*names, *tied)}
    for name, param in parameters:
        if storage_id(param) not in covered:
            raise M2N2Error(f"the model's tensor {name!r} is not in {what}")


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
    with Checkpoint(path, io, pin_memory=on_cuda(model)) as ckpt:
        names: list[str] = []
        seen: set[int] = set()
        for name in ckpt.entries:
            if name not in params:
                raise M2N2Error(f"tensor {name!r} of {path} does not belong to the model")
        for name, tensor in params.items():  # the model's order: embeddings before lm_head
            if name in ckpt.entries and storage_id(tensor) not in seen:
                seen.add(storage_id(tensor))
                names.append(name)
        check_model_tensors(
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


def build_resident_model(
    config: PretrainedConfig,
    weights: str | os.PathLike[str],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    weights_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The resident model on ``device``, holding ``weights`` (a seed), without a random init.

    ``from_config`` would draw every parameter at random and then the first merge overwrites
    them all: minutes of CPU for a 7 B model, for nothing. Here the tensors are allocated where
    they will live (a ``torch.device`` context: straight on the GPU, never staged in host
    memory) with transformers' ``no_init_weights``, the tied weights are tied, and the seed's
    tensors are read in one at a time. Buffers that are not in a checkpoint (the rotary
    ``inv_freq``) are computed by the modules' constructors, on the device, as usual.

    Why not the meta device: ``to_empty`` from meta leaves such buffers uninitialised, and
    transformers recomputes them only inside ``from_pretrained``'s own loading path.

    Args:
        config: the seeds' Hugging Face config.
        weights: a seed's model folder or safetensors file; every parameter must be in it.
        dtype: the resident model's dtype.
        device: where it lives (already checked: :func:`m2n2_plugin.devices.resolve_device`).
        weights_dtype: mergekit's ``dtype``, applied as the seed is read (as for any seed).
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x kept it here
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # ``no_init_weights`` also skips the tying done after the init
    model.eval()
    load_checkpoint_into_model(model, weights, dtype=weights_dtype)
    return model


def save_model_tensors(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    names: Mapping[str, torch.dtype | None] | Iterable[str] | None = None,
) -> None:
    """Write the model's current tensors to a safetensors file, atomically.

    ``names``: which tensors (default: the whole state dict), optionally mapped to the dtype to
    store each in. A tensor sharing storage with one already listed (a tied ``lm_head``) is
    left out. Tensors already in the right dtype are written from the model's own memory
    (safetensors serialises from the pointers): no copy of the model is made; a model on a GPU
    is streamed to the file one tensor at a time (each cast on the device).
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
        if storage_id(tensor) in seen:
            continue
        seen.add(storage_id(tensor))
        if store_as is not None and tensor.dtype != store_as:
            tensor = tensor.to(store_as)
        tensors[name] = tensor
    save_tensors_atomic(tensors, Path(path))
