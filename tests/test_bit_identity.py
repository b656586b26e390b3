"""Merges are pinned bit for bit: the kernel, the in-memory mergekit path and the resident path.

The digests below were taken from the code before the layout/kernel redesign (issue 16) and
checked equal after it (190 merged outputs compared: in memory, ``mergekit-yaml``, resident,
saved children, flat vectors). A change to the arithmetic -- the order of the sums behind the
angle, the coefficients, the in-place write -- shows up here as a changed digest. The kernel is
also checked against an independent float64 numpy reference.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_llama
from tiny_models import random_tiny_llama
from tiny_models import tiny_llama_config

from m2n2_plugin.merge.kernel import MERGEKIT_DOT_THRESHOLD
from m2n2_plugin.merge.kernel import split_index
from m2n2_plugin.merge.kernel import split_slerp
from m2n2_plugin.merge.method import m2n2_merge_state_dicts
from m2n2_plugin.merge.resident import merge_into_model

CASES = [(0.3, 0.6, "element"), (0.8, 0.013, "element"), (0.65, 0.47, "layer")]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _flat(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


FLAT_DIGESTS = {None: "576ccb90624d5b34", MERGEKIT_DOT_THRESHOLD: "576ccb90624d5b34"}
MODEL_DIGESTS = dict(
    zip(CASES, ["33a5690826dda8ba", "3fc680d9ebee2e2f", "b418612d8e7e7911"], strict=True)
)


@pytest.mark.parametrize("dot_threshold", [None, MERGEKIT_DOT_THRESHOLD])
def test_flat_kernel_digest(dot_threshold: float | None) -> None:
    x, y = _flat(100_003)
    out = {
        f"{w}-{s}": split_slerp(x, y, w, split_index(s, x.numel()), dot_threshold=dot_threshold)
        for w, s in ((0.3, 0.6), (0.9, 0.1), (0.5, 0.0))
    }
    assert _digest(out) == FLAT_DIGESTS[dot_threshold]


def test_kernel_matches_numpy_reference() -> None:
    x, y = _flat(10_007)
    xs, ys = x.double().numpy(), y.double().numpy()
    omega = np.arccos(np.clip(xs @ ys / np.linalg.norm(xs) / np.linalg.norm(ys), -1, 1))
    for w, s in ((0.3, 0.6), (0.9, 0.1)):
        k = split_index(s, xs.size)
        t = np.where(np.arange(xs.size) < k, w, 1 - w)
        ref = (np.sin((1 - t) * omega) * xs + np.sin(t * omega) * ys) / np.sin(omega)
        got = split_slerp(x, y, w, k).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_model_merge_digest_and_resident_equal(case: tuple, tmp_path: Path) -> None:
    """mergekit's path (in memory) gives the pinned bits; the resident merge the same bits."""
    mix_ratio, split_point, granularity = case
    config = tiny_llama_config(num_hidden_layers=3)
    parents = [dict(random_tiny_llama(config, seed=s).state_dict()) for s in (1, 2)]
    merged = m2n2_merge_state_dicts(
        *parents,
        mix_ratio=mix_ratio,
        split_point=split_point,
        config=config,
        granularity=granularity,
    )
    assert _digest(merged) == MODEL_DIGESTS[case]
    paths = [
        make_tiny_llama(tmp_path / f"p{s}", seed=s, config=config, tokenizer=False) for s in (1, 2)
    ]
    model = random_tiny_llama(config, seed=9)
    merge_into_model(
        model, *paths, mix_ratio=mix_ratio, split_point=split_point, granularity=granularity
    )
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
