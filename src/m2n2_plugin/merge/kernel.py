"""Split-point SLERP: the M2N2 crossover, as one plain function.

Parents are two flat vectors ``x`` (parent A) and ``y`` (parent B) in the model's parameter
order. A split index ``s`` cuts the vector in two: elements before ``s`` are mixed with
``t = mix_ratio`` (the weight on parent B), elements from ``s`` on with ``t = 1 - mix_ratio``.
Both halves share ONE angle Omega, the angle between the whole ``x`` and ``y``::

    child_k = sin((1 - t_k) Omega) / sin Omega * x_k + sin(t_k Omega) / sin Omega * y_k

This is the official M2N2 code's crossover (the paper writes two SLERPs with their own angles;
the code uses one). When the vectors are (anti)parallel SLERP is undefined and we fall back to
linear interpolation ``(1 - t) x + t y``.

The same function serves three callers:

* the flat-vector form (the digits MLP): the whole model is one vector, so the angle is the
  tensor's own angle and the fallback is the official ``sin Omega <= 1e-6``;
* a model held as many tensors with one global angle: compute :func:`global_cosine` over all
  tensors once and pass it as ``cos`` for every tensor, with each tensor's split index shifted
  by the tensor's offset in the global order;
* the mergekit method (one angle per tensor, as mergekit's own ``slerp``): pass
  ``dot_threshold=0.9995`` so the linear fallback is mergekit's rule, ``|cos| > 0.9995``.

The arithmetic runs in float32 (float64 stays float64) whatever the storage dtype, so bf16
parents merge without bf16 rounding in the intermediate sums; the result has the input dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from collections.abc import Sequence

import torch

from m2n2_plugin.errors import M2N2ConfigError

#: Below this ``sin(Omega)`` the official code uses linear interpolation.
MIN_SIN_OMEGA = 1e-6
#: mergekit's ``slerp`` lerps when ``|cos Omega|`` exceeds this.
MERGEKIT_DOT_THRESHOLD = 0.9995
#: Norms at or below this are not divided out (mergekit's rule): a zero tensor keeps cos = 0.
NORM_EPS = 1e-8


#: The most split points one crossover may have (``search.split_points``).
MAX_SPLIT_POINTS = 4


def split_point_names(k: int) -> list[str]:
    """The parameter names of ``k`` split points: ``split_point``, ``split_point_2``, ..."""
    return ["split_point"] + [f"split_point_{i}" for i in range(2, k + 1)]


#: Where the split may fall: anywhere (``element``, the paper) or on a layer boundary.
GRANULARITIES = ("element", "layer")


def check_unit_interval(name: str, value: object) -> float:
    """``value`` as a float in [0, 1], else a one-line :class:`M2N2ConfigError`.

    The one check of ``mix_ratio`` and ``split_point``, whoever takes them (the mergekit
    parameter validators, the resident merge, the kernel). NaN, booleans and non-numbers fail.
    """
    number = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            pass
    if not 0.0 <= number <= 1.0:
        raise M2N2ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return number


def check_granularity(value: object) -> str:
    """``value`` if it is a granularity m2n2 knows, else a one-line :class:`M2N2ConfigError`."""
    if value not in GRANULARITIES:
        raise M2N2ConfigError(f"granularity must be 'element' or 'layer', got {value!r}")
    return str(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_index(split_point: float, n: int) -> int:
    """Map a split point in [0, 1] to an element index in [0, n].

    ``floor(split_point * n)``: a split point drawn from U[0, 1) gives the official code's
    ``UniformInt{0, ..., n-1}``; ``split_point = 1`` puts every element before the split.
    """
    split_point = check_unit_interval("split_point", split_point)
    return min(n, int(math.floor(split_point * n)))


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"parents have different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"parents have different dtypes: {a.dtype} vs {b.dtype}")
    if not a.is_floating_point():
        raise TypeError(f"split-point SLERP needs floating-point tensors, got {a.dtype}")


#: Elements per block of the norm/dot sums (fixed, so the summation order never changes).
SUM_BLOCK = 1 << 20


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> as a Python float, reproducible across machines and settings.

    The angle decides every coefficient of the child, so it must not depend on how the sum is
    computed. A float32 ``torch.dot`` over tens of millions of elements does: its result moves
    in the 4th significant digit with the number of threads (and is that far off), and in the
    last bits with the tensors' memory alignment. So each product is rounded in the compute
    dtype (elementwise: deterministic) and summed in float64 over fixed blocks added in order;
    the result was bit-identical with 1 and 2 threads and any alignment we tried, and a rebuild
    of the same merge elsewhere gives the same bits.
    """
    work = compute_dtype(a.dtype)
    x = a.reshape(-1)
    y = b.reshape(-1)
    if x.device.type == "mps":  # no float64 on Apple GPUs: float32 per block, float64 here
        total = 0.0
        for lo in range(0, x.numel(), SUM_BLOCK):
            xs = x[lo : lo + SUM_BLOCK].to(work)
            total += float(torch.sum(xs * y[lo : lo + SUM_BLOCK].to(work)))
        return total
    if x.device.type != "cpu":
        # On a GPU the blocks' float64 sums stay there and are read back once: a ``float()``
        # per block would wait for the device every 2^20 elements. (A GPU reduces in its own
        # order, so the last bits differ from the CPU's; each device is deterministic.)
        acc = torch.zeros((), dtype=torch.float64, device=x.device)
        for lo in range(0, x.numel(), SUM_BLOCK):
            xs = x[lo : lo + SUM_BLOCK].to(work)
            ys = y[lo : lo + SUM_BLOCK].to(work)
            acc += torch.sum(xs * ys, dtype=torch.float64)
        return float(acc)
    total = 0.0
    for lo in range(0, x.numel(), SUM_BLOCK):
        xs = x[lo : lo + SUM_BLOCK].to(work)
        ys = y[lo : lo + SUM_BLOCK].to(work)
        total += float(torch.sum(xs * ys, dtype=torch.float64))
    return total


def squared_norm(a: torch.Tensor) -> float:
    """|a|^2 exactly as :func:`cosine` sums it (same blocks, same order, same bits).

    A parent's squared norms do not depend on the other parent, so a caller that merges the
    same parent many times (an archive member) can keep them and pass them to :func:`cosine`,
    which then makes one product pass instead of three.
    """
    return _dot64(a, a)


def _partial_sums(
    a: torch.Tensor,
    b: torch.Tensor,
    aa: float | None = None,
    bb: float | None = None,
) -> tuple[float, float, float]:
    """(|a|^2, |b|^2, <a, b>) by :func:`_dot64`; a squared norm passed in is not recomputed."""
    return (
        squared_norm(a) if aa is None else aa,
        squared_norm(b) if bb is None else bb,
        _dot64(a, b),
    )


def _cosine_from_sums(aa: float, bb: float, ab: float, eps: float = NORM_EPS) -> float:
    na = math.sqrt(aa)
    nb = math.sqrt(bb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    return min(1.0, max(-1.0, ab / (na * nb)))


def cosine(
    a: torch.Tensor,
    b: torch.Tensor,
    eps: float = NORM_EPS,
    *,
    squared_norms: tuple[float | None, float | None] = (None, None),
) -> float:
    """cos of the angle between two tensors seen as flat vectors, clipped to [-1, 1].

    A norm at or below ``eps`` is not divided out, so a zero tensor gives cos = 0 (mergekit's
    convention; the official code would divide by zero). ``squared_norms``: ``|a|^2`` and
    ``|b|^2`` from :func:`squared_norm` where already known (None: computed here).
    """
    _check_pair(a, b)
    return _cosine_from_sums(*_partial_sums(a, b, *squared_norms), eps=eps)


def global_cosine(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], eps: float = NORM_EPS
) -> float:
    """cos of the ONE angle between two models given as (tensor of A, tensor of B) pairs.

    Equal to :func:`cosine` of the two concatenated flat vectors, without concatenating.
    """
    aa = bb = ab = 0.0
    for a, b in pairs:
        _check_pair(a, b)
        da, db, dab = _partial_sums(a, b)
        aa += da
        bb += db
        ab += dab
    return _cosine_from_sums(aa, bb, ab, eps=eps)


def _is_linear(cos: float, dot_threshold: float | None) -> bool:
    """Whether SLERP falls back to linear interpolation for this angle (see below)."""
    if dot_threshold is not None:
        return abs(cos) > dot_threshold
    return math.sin(math.acos(min(1.0, max(-1.0, cos)))) <= MIN_SIN_OMEGA


def slerp_coefficients(
    t: float, cos: float, dot_threshold: float | None = None
) -> tuple[float, float]:
    """The weights (on parent A, on parent B) of SLERP at ratio ``t`` for an angle ``acos(cos)``.

    Linear ``(1 - t, t)`` where SLERP is undefined: ``sin Omega <= 1e-6`` (official rule) when
    ``dot_threshold`` is None, else ``|cos| > dot_threshold`` (mergekit's rule).
    """
    if _is_linear(cos, dot_threshold):
        return 1.0 - t, t
    omega = math.acos(min(1.0, max(-1.0, cos)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def split_slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    mix_ratio: float,
    split: int | Sequence[int],
    *,
    cos: float | None = None,
    dot_threshold: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-point SLERP of parent A (``a``) and parent B (``b``): the one crossover.

    Args:
        a, b: same shape and dtype, floating point. Flattened in row-major order.
        mix_ratio: ``w`` in [0, 1]; ``t = w`` (weight on B) for flat indices ``< split``,
            ``t = 1 - w`` from ``split`` on.
        split: split index into the flattened tensor; values outside ``[0, numel]`` are
            clamped, which is how a tensor that lies wholly before or after a model-wide split
            point is handled (pass ``global_split - tensor_offset``). Several split indices
            (``search.split_points``) cut it into segments whose ratio alternates: ``w``
            before the first, ``1 - w`` up to the second, ``w`` again, and so on.
        cos: the cosine of the angle to use. None: the angle between ``a`` and ``b``
            themselves. Pass :func:`global_cosine` of a whole model to get the official code's
            single angle over all parameters.
        dot_threshold: None for the official fallback (``sin Omega <= 1e-6``); a float for
            mergekit's (``|cos| > dot_threshold``).
        out: tensor of ``a``'s shape to write the child into (e.g. a resident model's
            parameter). When it has ``a``'s dtype and that is the compute dtype, the child is
            computed straight into it (no temporary, no extra pass): ``out`` may then be ``a``
            itself (each element is read before it is written) but never ``b``. Otherwise the
            child is computed in a temporary and cast into ``out``.

    Parents that are equal and whose angle takes the linear fallback give parent A bit for
    bit: SLERP of a vector with itself is that vector, but ``(1 - t) x + t x`` can be an ulp
    off in float32.

    Returns:
        The child: ``out``, or a new tensor with ``a``'s shape and dtype.
    """
    _check_pair(a, b)
    mix_ratio = check_unit_interval("mix_ratio", mix_ratio)
    if out is not None and out.shape != a.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(a.shape)}")
    if cos is None:
        cos = cosine(a, b)
    if _is_linear(cos, dot_threshold) and torch.equal(a, b):
        if out is None:
            return a.clone()
        if out.data_ptr() != a.data_ptr():
            out.copy_(a)
        return out
    n = a.numel()
    cuts = sorted(
        min(max(int(s), 0), n) for s in (split if isinstance(split, Sequence) else [split])
    )
    edges = [0, *cuts, n]
    work = compute_dtype(a.dtype)
    direct = out is not None and out.dtype == a.dtype == work and out.is_contiguous()
    result = out.view(-1) if direct else torch.empty(n, dtype=work, device=a.device)
    x = a.reshape(-1)
    y = b.reshape(-1)
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        t = mix_ratio if i % 2 == 0 else 1.0 - mix_ratio
        if hi <= lo:
            continue
        coef_a, coef_b = slerp_coefficients(t, cos, dot_threshold)
        part = result[lo:hi]
        torch.mul(x[lo:hi].to(work), coef_a, out=part)
        part.add_(y[lo:hi].to(work), alpha=coef_b)
    if out is None:
        return result.view(a.shape).to(a.dtype)
    if not direct:
        out.copy_(result.view(a.shape))
    return out
