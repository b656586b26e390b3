"""The mergekit method ``m2n2`` in process: layout, in-memory merges, errors, registration.

The ``mergekit-yaml`` console script itself is exercised in test_merge_method_cli.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import as_numpy
from tiny_models import llama_layer_boundaries
from tiny_models import llama_tensor_order
from tiny_models import load_tensors
from tiny_models import make_tiny_llama
from tiny_models import numpy_m2n2
from tiny_models import random_tiny_llama
from tiny_models import tiny_llama_config

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.inputs import architecture_tensor_names
from m2n2_plugin.merge.layout import ModelLayout
from m2n2_plugin.merge.layout import layout_for_state_dict
from m2n2_plugin.merge.layout import tensor_layout
from m2n2_plugin.merge.method import m2n2_merge_method
from m2n2_plugin.merge.method import m2n2_merge_state_dicts

LAYERS = 3


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config(num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def parents(config):
    """Two different fp32 untied tiny Llamas as state dicts."""
    return (
        dict(random_tiny_llama(config, seed=1).state_dict()),
        dict(random_tiny_llama(config, seed=2).state_dict()),
    )


def _order(config, tied=False):
    return llama_tensor_order(config.num_hidden_layers, tied=tied)


def _shapes(state_dict):
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def _split_inside(state_dict, order, name, fraction=1 / 3):
    """A split point whose split index falls strictly inside tensor ``name``."""
    spans = tensor_layout(order, {n: state_dict[n].numel() for n in order})
    total = sum(numel for _, numel in spans.values())
    offset, numel = spans[name]
    split = offset + int(numel * fraction)
    split_point = (split + 0.5) / total
    assert math.floor(split_point * total) == split and offset < split < offset + numel
    return split_point, split


# --------------------------------------------------------------------------------------------
# Layout


def test_tensor_layout_offsets():
    spans = tensor_layout(["a", "b", "c"], {"a": 6, "b": 0, "c": 4})
    assert spans == {"a": (0, 6), "b": (6, 0), "c": (6, 4)}
    with pytest.raises(ValueError, match="twice"):
        tensor_layout(["a", "a"], {"a": 1})


def test_architecture_order_is_mergekits_llama_order(config, tmp_path):
    assert architecture_tensor_names(config) == _order(config)
    tied = tiny_llama_config(num_hidden_layers=LAYERS, tie_word_embeddings=True)
    assert architecture_tensor_names(tied) == _order(tied, tied=True)
    # A model directory: the checkpoint decides (a tied lm_head is not stored, so not counted).
    path = make_tiny_llama(tmp_path / "tied", seed=5, config=tied, tokenizer=False)
    assert architecture_tensor_names(path) == _order(tied, tied=True)


def test_layout_of_a_state_dict_counts_tied_embeddings_once(config, parents):
    layout = layout_for_state_dict(parents[0], config)
    order = _order(config)
    assert layout.names == order
    assert layout.total == sum(parents[0][n].numel() for n in order)
    assert list(layout.boundaries) == llama_layer_boundaries(_shapes(parents[0]), LAYERS)

    tied = tiny_llama_config(num_hidden_layers=LAYERS, tie_word_embeddings=True)
    state = dict(random_tiny_llama(tied, seed=3).state_dict())
    assert "lm_head.weight" in state  # state_dict() lists the tied weight twice
    tied_layout = layout_for_state_dict(state, tied)
    assert tied_layout.names == _order(tied, tied=True)
    assert tied_layout.total == layout.total - parents[0]["lm_head.weight"].numel()


def test_split_index_element_and_layer():
    layout = ModelLayout(
        spans={"pre": (0, 10), "l0": (10, 20), "l1": (30, 20), "post": (50, 10)},
        shapes={},
        boundaries=(10, 30, 50),
    )
    assert layout.total == 60
    assert layout.split_index(0.0) == 0
    assert layout.split_index(1.0) == 60
    assert layout.split_index(0.5) == 30
    assert layout.split_index(0.55) == 33
    assert layout.split_index(0.0, "layer") == 10  # the pre-weights always go with part one
    assert layout.split_index(1.0, "layer") == 50  # the post-weights always with part two
    assert layout.split_index(0.55, "layer") == 30
    assert layout.split_index(20 / 60, "layer") == 10  # a tie goes to the earlier boundary
    with pytest.raises(M2N2ConfigError, match="granularity"):
        layout.split_index(0.5, "tensor")


def test_local_split():
    layout = ModelLayout(spans={"a": (0, 10), "b": (10, 20)}, shapes={})
    assert layout.local_split("b", 5) == 0
    assert layout.local_split("b", 10) == 0
    assert layout.local_split("b", 17) == 7
    assert layout.local_split("b", 30) == 20
    assert layout.local_split("b", 99) == 20
    # A vocabulary tensor resized by tokenizer alignment keeps the fraction.
    assert layout.local_split("b", 20, numel=40) == 20
    assert layout.local_split("b", 30, numel=40) == 40


# --------------------------------------------------------------------------------------------
# In-memory merges against the numpy reference


@pytest.mark.parametrize(
    ("mix_ratio", "split_point"),
    [(0.3, "inside"), (0.0, 1.0), (0.0, 0.0), (1.0, 0.5), (0.8, 0.999), (0.45, 0.0001)],
)
def test_in_memory_matches_numpy(config, parents, mix_ratio, split_point):
    order = _order(config)
    if split_point == "inside":
        split_point, _ = _split_inside(parents[0], order, "model.layers.1.self_attn.q_proj.weight")
    total = sum(parents[0][n].numel() for n in order)
    merged = m2n2_merge_state_dicts(
        parents[0], parents[1], mix_ratio=mix_ratio, split_point=split_point, config=config
    )
    assert list(merged) == order
    split = math.floor(split_point * total)
    expected = numpy_m2n2(as_numpy(parents[0]), as_numpy(parents[1]), order, mix_ratio, split)
    for name in order:
        assert merged[name].dtype == torch.float32
        np.testing.assert_allclose(merged[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)


def test_several_split_points_alternate_the_ratio(config, parents):
    """search.split_points: the ratio alternates between the (sorted) split points."""
    order = _order(config)
    points = [
        _split_inside(parents[0], order, name, fraction)[0]
        for name, fraction in [
            ("model.layers.2.mlp.up_proj.weight", 0.5),
            ("model.layers.0.self_attn.k_proj.weight", 0.25),
            ("model.layers.1.mlp.down_proj.weight", 0.75),
        ]
    ]
    total = sum(parents[0][n].numel() for n in order)
    merged = m2n2_merge_state_dicts(
        parents[0], parents[1], mix_ratio=0.3, split_point=points, config=config
    )
    splits = [math.floor(p * total) for p in points]
    expected = numpy_m2n2(as_numpy(parents[0]), as_numpy(parents[1]), order, 0.3, splits)
    for name in order:
        np.testing.assert_allclose(merged[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)
    # Not the one-split child: from the second split on, the ratio is mix_ratio again.
    one = m2n2_merge_state_dicts(
        parents[0], parents[1], mix_ratio=0.3, split_point=min(points), config=config
    )
    between = "model.layers.2.self_attn.q_proj.weight"  # after the 2nd split, before the 3rd
    assert not torch.allclose(one[between], merged[between])
    # Two equal split points cancel: every parameter gets mix_ratio, as with split_point 1.
    twice = m2n2_merge_state_dicts(
        parents[0], parents[1], mix_ratio=0.3, split_point=[0.4, 0.4], config=config
    )
    none = m2n2_merge_state_dicts(
        parents[0], parents[1], mix_ratio=0.3, split_point=1.0, config=config
    )
    for name in order:
        assert torch.equal(twice[name], none[name]), name
    with pytest.raises(M2N2ConfigError, match="1 to 4 split points"):
        m2n2_merge_state_dicts(
            parents[0], parents[1], mix_ratio=0.3, split_point=[0.1] * 5, config=config
        )


def test_in_memory_extremes_are_exact(config, parents):
    a, b = parents
    only_a = m2n2_merge_state_dicts(a, b, mix_ratio=0.0, split_point=1.0, config=config)
    only_b = m2n2_merge_state_dicts(a, b, mix_ratio=0.0, split_point=0.0, config=config)
    same = m2n2_merge_state_dicts(a, dict(a), mix_ratio=0.37, split_point=0.42, config=config)
    for name in _order(config):
        assert torch.equal(only_a[name], a[name])
        assert torch.equal(only_b[name], b[name])
        assert torch.equal(same[name], a[name])


def test_in_memory_tied_bf16(tmp_path):
    tied = tiny_llama_config(num_hidden_layers=2, tie_word_embeddings=True)
    a = dict(random_tiny_llama(tied, seed=11, dtype=torch.bfloat16).state_dict())
    b = dict(random_tiny_llama(tied, seed=12, dtype=torch.bfloat16).state_dict())
    order = _order(tied, tied=True)
    split_point, split = _split_inside(a, order, "model.embed_tokens.weight", 0.6)
    merged = m2n2_merge_state_dicts(a, b, mix_ratio=0.7, split_point=split_point, config=tied)
    assert list(merged) == [*order, "lm_head.weight"]
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    expected = numpy_m2n2(as_numpy(a), as_numpy(b), order, 0.7, split)
    for name in order:
        assert merged[name].dtype == torch.bfloat16
        want = torch.from_numpy(expected[name]).to(torch.bfloat16).float()
        torch.testing.assert_close(merged[name].float(), want, rtol=2**-7, atol=1e-6)


def test_layer_granularity_moves_the_split_to_a_layer_boundary(config, parents):
    a, b = parents
    order = _order(config)
    boundaries = llama_layer_boundaries(_shapes(a), LAYERS)
    total = sum(a[n].numel() for n in order)
    split_point = (boundaries[2] - 7) / total
    layered = m2n2_merge_state_dicts(
        a, b, mix_ratio=0.25, split_point=split_point, config=config, granularity="layer"
    )
    expected = numpy_m2n2(as_numpy(a), as_numpy(b), order, 0.25, boundaries[2])
    for name in order:
        np.testing.assert_allclose(layered[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"mix_ratio": 1.5}, r"mix_ratio must be a number in \[0, 1\], got 1.5"),
        ({"split_point": -0.1}, r"split_point must be a number in \[0, 1\], got -0.1"),
        ({"mix_ratio": "half"}, "mix_ratio must be a number"),
        ({"mix_ratio": float("nan")}, "mix_ratio must be a number"),
        ({"mix_ratio": None}, "parameters.mix_ratio is required"),
        ({"granularity": "tensor"}, "granularity must be 'element' or 'layer'"),
    ],
)
def test_bad_parameters_are_one_line_errors(config, parents, parameters, message):
    kwargs = {"mix_ratio": 0.5, "split_point": 0.5, "config": config, **parameters}
    with pytest.raises(M2N2ConfigError, match=message) as info:
        m2n2_merge_state_dicts(*parents, **kwargs)
    assert isinstance(info.value, M2N2Error)
    assert "\n" not in info.value.format_message()


def test_different_shapes_are_an_error(config, parents):
    wide = tiny_llama_config(num_hidden_layers=LAYERS, hidden_size=48)
    other = dict(random_tiny_llama(wide, seed=4).state_dict())
    with pytest.raises(M2N2ConfigError, match="different shapes: model.embed_tokens.weight"):
        m2n2_merge_state_dicts(parents[0], other, mix_ratio=0.5, split_point=0.5, config=config)
    deeper = dict(random_tiny_llama(tiny_llama_config(num_hidden_layers=4), seed=4).state_dict())
    with pytest.raises(M2N2ConfigError, match="different tensors"):
        m2n2_merge_state_dicts(
            parents[0], deeper, mix_ratio=0.5, split_point=0.5, config=tiny_llama_config()
        )


def test_mergekit_merge_state_dicts_without_a_layout_says_what_to_use(parents):
    from mergekit.merge_methods import merge_state_dicts

    with pytest.raises(M2N2ConfigError, match="m2n2_merge_state_dicts"):
        merge_state_dicts(
            {"a": parents[0], "b": parents[1]},
            "m2n2",
            parameters={"mix_ratio": 0.5, "split_point": 0.5},
            base="a",
        )
    with pytest.raises(M2N2ConfigError, match="exactly two models"):
        merge_state_dicts({"a": parents[0]}, m2n2_merge_method, base="a")


# --------------------------------------------------------------------------------------------
# mergekit's Python API (run_merge) with the method registered by the import hook


def test_run_merge_equals_in_memory_merge(tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge

    path_a = make_tiny_llama(tmp_path / "a", seed=21)
    path_b = make_tiny_llama(tmp_path / "b", seed=22)

    def config(**parameters):
        return MergeConfiguration.model_validate(
            {
                "merge_method": "m2n2",
                "base_model": str(path_a),
                "models": [{"model": str(path_a)}, {"model": str(path_b)}],
                "parameters": parameters,
            }
        )

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    run_merge(config(mix_ratio=0.6, split_point=0.3), str(tmp_path / "out"), options)
    written = load_tensors(tmp_path / "out")
    parent_a, parent_b = load_tensors(path_a), load_tensors(path_b)
    hf_config = json.loads((path_a / "config.json").read_text())
    from transformers import LlamaConfig

    in_memory = m2n2_merge_state_dicts(
        parent_a,
        parent_b,
        mix_ratio=0.6,
        split_point=0.3,
        config=LlamaConfig(**hf_config),
    )
    assert sorted(written) == sorted(in_memory)
    for name, tensor in written.items():
        assert torch.equal(tensor, in_memory[name]), name

    with pytest.raises(M2N2ConfigError, match="granularity"):
        run_merge(
            config(mix_ratio=0.6, split_point=0.3, granularity="rows"),
            str(tmp_path / "bad"),
            options,
        )
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------
# Registration (fresh interpreters, run side by side)


def _python(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def test_registration_scenarios():
    """The .pth hook, ``import m2n2_plugin`` before/after mergekit, and double imports."""
    scenarios = {
        # What the installed .pth does: nothing heavy at start-up, m2n2 known once mergekit is.
        "pth": _python(
            """
            import sys
            assert "m2n2_plugin" in sys.modules, "the .pth hook is not installed: pip install -e ."
            assert "torch" not in sys.modules and "mergekit" not in sys.modules
            from mergekit.merge_methods import get
            assert get("m2n2").spec.name == "m2n2"
            print("ok")
            """
        ),
        # Opted out of the .pth: importing the package is light and registers via the hook.
        "import-first": _python(
            """
            import sys
            assert "m2n2_plugin" not in sys.modules
            import m2n2_plugin
            assert "torch" not in sys.modules and "mergekit" not in sys.modules
            from mergekit.merge_methods import get, registered_methods
            assert get("m2n2") is m2n2_plugin.register()
            print("ok")
            """,
            M2N2_NO_AUTOLOAD="1",
        ),
        # mergekit first, then the plugin; imported, registered and reloaded twice.
        "mergekit-first": _python(
            """
            import importlib, warnings
            warnings.simplefilter("error", RuntimeWarning)
            from mergekit.merge_methods import get, registered_methods
            try:
                get("m2n2")
                raise SystemExit("m2n2 registered although M2N2_NO_AUTOLOAD is set")
            except RuntimeError:
                pass
            import m2n2_plugin
            first = get("m2n2")
            import m2n2_plugin.merge.method as mm
            assert m2n2_plugin.register() is first and mm.register() is first
            importlib.reload(mm)
            importlib.reload(m2n2_plugin)
            assert m2n2_plugin.register() is first
            names = [m.spec.name for m in registered_methods()]
            assert names.count("m2n2") == 1 and "slerp" in names
            print("ok")
            """,
            M2N2_NO_AUTOLOAD="1",
        ),
    }
    for name, process in scenarios.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "ok", f"{name}: {err[-2000:]}"


def test_pth_file_is_installed_with_the_distribution():
    from importlib.metadata import distribution

    files = [str(f) for f in distribution("m2n2-plugin").files or []]
    assert "m2n2_plugin_autoload.pth" in files, "reinstall: pip install torch==2.13.0 -e ."
    source = Path(__file__).parents[1] / "src" / "m2n2_plugin" / "m2n2_plugin_autoload.pth"
    line = source.read_text().strip()
    assert line.startswith("import ") and "\n" not in line
