"""Where the resident model lives: ``fitness.device`` (or ``m2n2 evolve --device``).

``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are accepted. The name is checked twice: its spelling
when the config is read (a typo is a config error), and whether this machine has that device
when a run starts, before anything is written -- lm-eval would otherwise evaluate a model that
sits on the CPU without a word (``HFLM`` keeps a pre-built model where it is), and the run would
be many times slower than the user planned for.
"""

from __future__ import annotations

import re

import torch

from m2n2_plugin.errors import M2N2Error

__all__ = ["DEVICE_PATTERN", "check_device_name", "resolve_device"]

#: The device names ``fitness.device`` accepts.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?|mps")


def check_device_name(name: str) -> str:
    """``name`` if it is spelt as a device m2n2 can use, else a ``ValueError`` (for pydantic)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def resolve_device(name: str, what: str = "fitness.device") -> torch.device:
    """The ``torch.device`` for ``name``, or a one-line :class:`M2N2Error` if it is absent.

    ``cuda`` means the current CUDA device (``cuda:0`` unless ``CUDA_VISIBLE_DEVICES`` or
    ``torch.cuda.set_device`` says otherwise), pinned here to an index so that every tensor of
    the run compares equal in ``.device``.
    """
    try:
        check_device_name(name)
    except ValueError as exc:
        raise M2N2Error(f"{what}: {exc}") from exc
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise M2N2Error(f"{what} is {name!r} but this machine has no usable MPS device")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = (
            "this torch was built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        )
        raise M2N2Error(f"{what} is {name!r} but {why}; use device: cpu or another machine")
    index = torch.cuda.current_device() if name == "cuda" else int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise M2N2Error(f"{what} is {name!r} but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)
