"""The real ``mergekit-yaml`` console script with ``merge_method: m2n2``, in subprocesses.

Each merge is a fresh interpreter that imports torch, transformers and mergekit (~6 s of CPU),
so all of them are started together by one fixture and run side by side; the tests then check
the results. The method is found through the installed ``.pth`` hook only: nothing here
imports the plugin into the subprocesses.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import MergekitRun
from tiny_models import as_numpy
from tiny_models import llama_layer_boundaries
from tiny_models import llama_tensor_order
from tiny_models import load_tensors
from tiny_models import m2n2_config
from tiny_models import make_tiny_llama
from tiny_models import mergekit_yaml_executable
from tiny_models import numpy_m2n2
from tiny_models import run_all
from tiny_models import save_as_pytorch_bin
from tiny_models import tiny_llama_config

pytestmark = pytest.mark.slow  # subprocesses: see pyproject's markers

LAYERS = 3
INSIDE = "model.layers.1.self_attn.q_proj.weight"  # where the "inside a tensor" split falls


def _mergekit_yaml() -> str:
    found = mergekit_yaml_executable()
    if not found:
        pytest.skip("mergekit-yaml is not installed")
    return found


def _total(tensors, order):
    return sum(tensors[name].numel() for name in order)


def _offsets(tensors, order):
    offsets, offset = {}, 0
    for name in order:
        offsets[name] = offset
        offset += tensors[name].numel()
    return offsets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Build the parents, write every config, run all merges concurrently."""
    exe = _mergekit_yaml()
    root = tmp_path_factory.mktemp("cli")
    untied = tiny_llama_config(num_hidden_layers=LAYERS)
    tied = tiny_llama_config(num_hidden_layers=LAYERS, tie_word_embeddings=True)
    models = {
        "a": make_tiny_llama(root / "a", seed=1, config=untied),
        "b": make_tiny_llama(root / "b", seed=2, config=untied),
        "ta": make_tiny_llama(root / "ta", seed=11, config=tied, dtype=torch.bfloat16),
        "tb": make_tiny_llama(root / "tb", seed=12, config=tied, dtype=torch.bfloat16),
    }
    models["a_copy"] = Path(shutil.copytree(models["a"], root / "a_copy"))
    for name in ("a", "b"):
        shutil.copytree(models[name], root / "models" / name)
    models["ta_bin"] = save_as_pytorch_bin(models["ta"], root / "ta_bin")
    models["tb_bin"] = save_as_pytorch_bin(models["tb"], root / "tb_bin")
    parents = {name: load_tensors(models[name]) for name in ("a", "b", "ta", "tb")}

    a, b, ta, tb = (models[k] for k in ("a", "b", "ta", "tb"))
    order = llama_tensor_order(LAYERS, tied=False)
    total = _total(parents["a"], order)
    inside = _offsets(parents["a"], order)[INSIDE] + parents["a"][INSIDE].numel() // 3
    tied_order = llama_tensor_order(LAYERS, tied=True)
    tied_total = _total(parents["ta"], tied_order)
    tied_inside = int(parents["ta"]["model.embed_tokens.weight"].numel() * 0.6)
    boundaries = llama_layer_boundaries(
        {n: tuple(t.shape) for n, t in parents["a"].items()}, LAYERS
    )
    facts = {
        "order": order,
        "tied_order": tied_order,
        "inside": (inside + 0.5) / total,
        "tied_inside": (tied_inside + 0.5) / tied_total,
        "layer_split": (boundaries[2] - 7) / total,  # snaps to the start of layer 2
    }
    slerp_slices = {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2]},
                    {"model": str(b), "layer_range": [0, 2]},
                ],
                "parameters": {"t": 0.25},
            },
            {
                "sources": [
                    {"model": str(a), "layer_range": [2, LAYERS]},
                    {"model": str(b), "layer_range": [2, LAYERS]},
                ],
                "parameters": {"t": 0.75},
            },
        ],
    }
    options_config = m2n2_config(
        models["ta_bin"],
        [models["ta_bin"], models["tb_bin"]],
        mix_ratio=0.7,
        split_point=facts["tied_inside"],
    )
    options_config.update(dtype="float32", out_dtype="bfloat16", tokenizer_source="base")
    runs = [
        MergekitRun(
            root, "inside", m2n2_config(a, [a, b], mix_ratio=0.3, split_point=facts["inside"])
        ),
        MergekitRun(root, "only_a", m2n2_config(a, [a, b], mix_ratio=0.0, split_point=1.0)),
        MergekitRun(root, "only_b", m2n2_config(a, [a, b], mix_ratio=0, split_point=0)),
        MergekitRun(
            root, "same", m2n2_config(a, [a, models["a_copy"]], mix_ratio=0.4, split_point=0.5)
        ),
        MergekitRun(
            root,
            "bf16",
            m2n2_config(ta, [ta, tb], mix_ratio=0.7, split_point=facts["tied_inside"]),
        ),
        MergekitRun(root, "options", options_config, ("--lazy-unpickle",)),
        MergekitRun(
            root,
            "layer",
            m2n2_config(
                a, [a, b], mix_ratio=0.25, split_point=facts["layer_split"], granularity="layer"
            ),
        ),
        MergekitRun(root, "slerp", slerp_slices),
        # Relative local paths with one slash, as a README example writes them: mergekit's
        # model card asks the Hub about them unless the plugin says they are local.
        MergekitRun(
            root,
            "relative",
            m2n2_config("models/a", ["models/a", "models/b"], mix_ratio=0.3, split_point=0.6),
            cwd=root,
        ),
    ]
    run_all(runs, exe)
    return {"runs": {run.name: run for run in runs}, "parents": parents, **facts, **models}


def _assert_matches_numpy(written, parent_a, parent_b, order, mix_ratio, split_point, bf16):
    split = math.floor(split_point * _total(parent_a, order))
    expected = numpy_m2n2(as_numpy(parent_a), as_numpy(parent_b), order, mix_ratio, split)
    assert sorted(written) == sorted(order)
    for name in order:
        want = torch.from_numpy(expected[name])
        if bf16:
            assert written[name].dtype == torch.bfloat16
            want = want.to(torch.bfloat16).float()
            torch.testing.assert_close(written[name].float(), want, rtol=2**-7, atol=1e-6)
        else:
            assert written[name].dtype == torch.float32
            torch.testing.assert_close(written[name].double(), want, rtol=1e-5, atol=1e-6)


def test_relative_local_paths_merge_offline_with_a_model_card(setup):
    """``models/a`` with HF_HUB_OFFLINE=1: mergekit 0.1.5 alone fails in its card step."""
    run = setup["runs"]["relative"]
    written = run.tensors()
    _assert_matches_numpy(
        written, setup["parents"]["a"], setup["parents"]["b"], setup["order"], 0.3, 0.6, False
    )
    card = (run.out / "README.md").read_text()
    assert "models/a" in card and "huggingface.co/models/a" not in card


def test_split_inside_a_tensor_matches_numpy_and_in_memory(setup):
    from transformers import AutoConfig

    from m2n2_plugin.merge.method import m2n2_merge_state_dicts

    run, parents = setup["runs"]["inside"], setup["parents"]
    written = run.tensors()
    _assert_matches_numpy(
        written, parents["a"], parents["b"], setup["order"], 0.3, setup["inside"], bf16=False
    )
    in_memory = m2n2_merge_state_dicts(
        parents["a"],
        parents["b"],
        mix_ratio=0.3,
        split_point=setup["inside"],
        config=AutoConfig.from_pretrained(setup["a"]),
    )
    assert list(in_memory) == setup["order"]
    for name, tensor in written.items():
        assert torch.equal(tensor, in_memory[name]), name
    assert (run.out / "config.json").exists() and (run.out / "tokenizer.json").exists()


@pytest.mark.parametrize(("run_name", "parent"), [("only_a", "a"), ("only_b", "b")])
def test_extremes_give_a_parent_exactly(setup, run_name, parent):
    written = setup["runs"][run_name].tensors()
    expected = setup["parents"][parent]
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name


def test_identical_parents_leave_the_model_unchanged(setup):
    written = setup["runs"]["same"].tensors()
    for name, tensor in setup["parents"]["a"].items():
        assert torch.equal(written[name], tensor), name


def test_bf16_tied_parents(setup):
    from transformers import AutoConfig

    from m2n2_plugin.merge.method import m2n2_merge_state_dicts

    parents = setup["parents"]
    written = setup["runs"]["bf16"].tensors()
    assert "lm_head.weight" not in written  # tied: stored (and counted) once, as embed_tokens
    _assert_matches_numpy(
        written,
        parents["ta"],
        parents["tb"],
        setup["tied_order"],
        0.7,
        setup["tied_inside"],
        bf16=True,
    )
    in_memory = m2n2_merge_state_dicts(
        parents["ta"],
        parents["tb"],
        mix_ratio=0.7,
        split_point=setup["tied_inside"],
        config=AutoConfig.from_pretrained(setup["ta"]),
    )
    for name, tensor in written.items():
        assert torch.equal(tensor, in_memory[name]), name


def test_mergekit_options_dtype_out_dtype_tokenizer_source_lazy_unpickle(setup):
    """``.bin`` parents read with --lazy-unpickle, merged in float32, written as bfloat16,
    tokenizer rebuilt from the base: the same tensors as the plain bf16 merge."""
    written = setup["runs"]["options"].tensors()
    plain = setup["runs"]["bf16"].tensors()
    assert sorted(written) == sorted(plain)
    for name, tensor in plain.items():
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], tensor), name
    assert (setup["runs"]["options"].out / "tokenizer.json").exists()


def test_layer_granularity_equals_builtin_slerp_with_two_slices(setup):
    layered = setup["runs"]["layer"].tensors()
    slerp = setup["runs"]["slerp"].tensors()
    assert sorted(layered) == sorted(slerp)
    for name, tensor in slerp.items():
        torch.testing.assert_close(layered[name], tensor, rtol=0, atol=1e-6)
    # Not trivially equal: layer 1 takes t = 0.25, layer 2 t = 0.75.
    parents = setup["parents"]
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.allclose(layered[name], parents["a"][name], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_option(setup):
    run = MergekitRun(
        setup["runs"]["inside"].config_path.parent,
        "cuda",
        yaml.safe_load(setup["runs"]["inside"].config_path.read_text()),
        ("--cuda",),
    )
    run.run(_mergekit_yaml())
    written = run.tensors()
    for name, tensor in setup["runs"]["inside"].tensors().items():
        torch.testing.assert_close(written[name], tensor, rtol=1e-5, atol=1e-6)
