"""A child merged tensor by tensor into one resident model equals mergekit's ``m2n2`` child.

The reference is :func:`m2n2_merge_state_dicts` (mergekit's own ``merge_state_dicts`` with the
``m2n2`` method, shown equal to ``mergekit-yaml`` in test_merge_method_cli.py) on the parents'
full state dicts, with mergekit's ``dtype`` applied to the inputs and ``out_dtype`` to the
result; one case runs the real ``mergekit-yaml`` too. Equality is bitwise (``torch.equal``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import MergekitRun
from tiny_models import load_tensors
from tiny_models import m2n2_config
from tiny_models import make_tiny_llama
from tiny_models import mergekit_yaml_executable
from tiny_models import tiny_llama_config

from m2n2_plugin.errors import M2N2ConfigError
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge import layout
from m2n2_plugin.merge import resident
from m2n2_plugin.merge.checkpoint import Checkpoint
from m2n2_plugin.merge.method import m2n2_merge_state_dicts
from m2n2_plugin.merge.models import read_tensors
from m2n2_plugin.merge.resident import merge_checkpoints
from m2n2_plugin.merge.resident import merge_into_model
from m2n2_plugin.merge.resident import save_child
from m2n2_plugin.merge.resident_model import load_checkpoint_into_model
from m2n2_plugin.merge.resident_model import save_model_tensors

LAYERS = 3
# (mix_ratio, split_point, granularity): splits inside the embeddings, inside a layer, at the
# ends, and a layer-granular one.
CASES = [
    (0.3, 0.6, "element"),
    (0.8, 0.013, "element"),
    (0.0, 0.0, "element"),
    (1.0, 1.0, "element"),
    (0.65, 0.47, "layer"),
]


def _config(tied: bool) -> object:
    return tiny_llama_config(num_hidden_layers=LAYERS, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny Llamas: untied/tied, float32/bfloat16, two seeds each, a wider one."""
    root = tmp_path_factory.mktemp("resident")
    out: dict[str, Path] = {}
    for tied in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for seed in (1, 2):
                key = f"{'tied' if tied else 'untied'}-{str(dtype)[6:]}-{seed}"
                out[key] = make_tiny_llama(
                    root / key, seed=seed, config=_config(tied), dtype=dtype, tokenizer=False
                )
    wide = tiny_llama_config(num_hidden_layers=LAYERS, hidden_size=48)
    out["wide"] = make_tiny_llama(root / "wide", seed=3, config=wide, tokenizer=False)
    return out


def resident_model(parent: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A model built from the parent's config, as ``m2n2 evolve`` builds its resident model."""
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(parent)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def reference(
    a: Path,
    b: Path,
    config: object,
    mix_ratio: float,
    split_point: float,
    granularity: str = "element",
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """mergekit's child: inputs cast to ``dtype``, merged in memory, cast to ``out_dtype``."""
    sd_a, sd_b = read_tensors(a), read_tensors(b)  # memory-mapped, as mergekit reads them
    if dtype is not None:
        sd_a = {k: v.to(dtype) for k, v in sd_a.items()}
        sd_b = {k: v.to(dtype) for k, v in sd_b.items()}
    merged = m2n2_merge_state_dicts(
        sd_a,
        sd_b,
        mix_ratio=mix_ratio,
        split_point=split_point,
        config=config,
        granularity=granularity,
    )
    if out_dtype is not None:
        merged = {k: v.to(out_dtype) for k, v in merged.items()}
    return merged


def assert_model_holds(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = model.state_dict()
    assert set(expected) <= set(params)
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor.to(params[name].dtype)), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("parents", ["float32", "bfloat16"])
def test_same_tensors_as_mergekit(models: dict[str, Path], tied: bool, parents: str) -> None:
    kind = "tied" if tied else "untied"
    a, b = models[f"{kind}-{parents}-1"], models[f"{kind}-{parents}-2"]
    model = resident_model(a, getattr(torch, parents))
    for mix_ratio, split_point, granularity in CASES:
        child = merge_into_model(
            model, a, b, mix_ratio=mix_ratio, split_point=split_point, granularity=granularity
        )
        expected = reference(a, b, model.config, mix_ratio, split_point, granularity)
        assert_model_holds(model, expected)
        assert child.exact and child.names == [
            n for n in expected if n != "lm_head.weight" or not tied
        ]
    if tied:  # one storage: the tied lm_head is the merged embedding matrix
        params = model.state_dict()
        assert (
            params["lm_head.weight"].data_ptr() == params["model.embed_tokens.weight"].data_ptr()
        )


@pytest.mark.parametrize(
    ("parents", "model_dtype", "dtype", "out_dtype"),
    [
        ("bfloat16", torch.float32, None, None),  # bf16 child in a float32 model
        ("bfloat16", torch.float32, torch.float32, torch.bfloat16),  # mergekit dtype/out_dtype
        ("float32", torch.float32, torch.bfloat16, None),
        ("float32", torch.bfloat16, None, None),  # the model cannot hold the child exactly
    ],
)
def test_dtypes_follow_mergekit(
    models: dict[str, Path],
    tmp_path: Path,
    parents: str,
    model_dtype: torch.dtype,
    dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
) -> None:
    a, b = models[f"tied-{parents}-1"], models[f"tied-{parents}-2"]
    model = resident_model(a, model_dtype)
    child = merge_into_model(
        model, a, b, mix_ratio=0.3, split_point=0.6, dtype=dtype, out_dtype=out_dtype
    )
    expected = reference(a, b, model.config, 0.3, 0.6, dtype=dtype, out_dtype=out_dtype)
    assert_model_holds(model, expected)
    # The saved child is mergekit's: its names (no tied duplicate) and dtypes, bit for bit.
    save_child(model, child, tmp_path / "child.safetensors")
    saved = load_file(str(tmp_path / "child.safetensors"))
    assert set(saved) == set(expected) - {"lm_head.weight"}
    for name, tensor in saved.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert child.exact == (model_dtype != torch.bfloat16 or parents == "bfloat16")


def test_mixed_parent_dtypes_are_promoted(models: dict[str, Path]) -> None:
    a, b = models["untied-bfloat16-1"], models["untied-float32-2"]
    model = resident_model(a, torch.float32)
    child = merge_into_model(model, a, b, mix_ratio=0.7, split_point=0.2)
    assert_model_holds(model, reference(a, b, model.config, 0.7, 0.2))
    assert set(child.dtypes.values()) == {torch.float32}


def test_child_files_sharded_folders_and_mmap(models: dict[str, Path], tmp_path: Path) -> None:
    """Parents as an archive file and as a sharded folder; the safe_open reader agrees."""
    from transformers import AutoModelForCausalLM

    a, b = models["untied-float32-1"], models["untied-float32-2"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(b).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    with Checkpoint(sharded) as checkpoint:
        assert len(checkpoint.files) > 1
    model = resident_model(a, torch.float32)
    first = merge_into_model(model, a, sharded, mix_ratio=0.4, split_point=0.3)
    archived = tmp_path / "archive" / "trial_000003.safetensors"
    save_child(model, first, archived)
    assert torch.equal(
        load_file(str(archived))["lm_head.weight"],
        reference(a, b, model.config, 0.4, 0.3)["lm_head.weight"],
    )
    for io in ("read", "mmap"):
        merge_into_model(model, archived, a, mix_ratio=0.9, split_point=0.75, io=io)
        assert_model_holds(model, reference(archived, a, model.config, 0.9, 0.75))
    state = merge_checkpoints(archived, a, config=model.config, mix_ratio=0.9, split_point=0.75)
    for name, tensor in state.items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_parent_a_read_straight_into_the_model(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors at 64-byte aligned file offsets: parent A is read into the parameters and the
    child computed over it in place; still mergekit's bits. Buffers: kept, or not."""
    from safetensors.torch import save_file

    a, b = models["untied-float32-1"], models["untied-float32-2"]
    tensors = load_tensors(a)
    aligned = tmp_path / "aligned.safetensors"
    for pad in range(64):  # the metadata's length moves the data's start
        save_file(tensors, str(aligned), metadata={"pad": "x" * pad})
        with Checkpoint(aligned) as checkpoint:
            if all(e.start % 64 == 0 for e in checkpoint.entries.values()):
                break
    else:
        pytest.fail("no padding aligns the tensors")
    in_place: list[bool] = []
    kernel = resident.split_slerp

    def spy(x: torch.Tensor, y: torch.Tensor, *rest: object, **kw: object) -> torch.Tensor:
        out = kw.get("out")
        in_place.append(out is not None and x.data_ptr() == out.data_ptr())  # type: ignore[attr-defined]
        return kernel(x, y, *rest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(resident, "split_slerp", spy)
    model = resident_model(a, torch.float32)
    merge_into_model(model, aligned, b, mix_ratio=0.35, split_point=0.55)
    assert_model_holds(model, reference(aligned, b, model.config, 0.35, 0.55))
    assert in_place and all(in_place)
    # The caller's scratch is filled by one merge and reused, not reallocated, by the next;
    # the parents' norms come from it the second time (same bits).
    scratch = resident.MergeScratch()
    merge_into_model(model, b, aligned, mix_ratio=0.35, split_point=0.55, scratch=scratch)
    assert_model_holds(model, reference(b, aligned, model.config, 0.35, 0.55))
    assert scratch.b  # parent A went straight into the model; B through its buffer
    assert len(scratch.norms) == 2  # both parents' files
    held = {k: v.data_ptr() for k, v in [*scratch.a.items(), *scratch.b.items()]}
    merge_into_model(model, aligned, b, mix_ratio=0.35, split_point=0.55, scratch=scratch)
    assert_model_holds(model, reference(aligned, b, model.config, 0.35, 0.55))
    assert {k: v.data_ptr() for k, v in [*scratch.a.items(), *scratch.b.items()]} == held


def test_identical_parents_give_the_parent(models: dict[str, Path]) -> None:
    a = models["tied-bfloat16-1"]
    model = resident_model(a, torch.bfloat16)
    merge_into_model(model, a, a, mix_ratio=0.37, split_point=0.52)
    assert_model_holds(model, load_tensors(a))


def test_seed_load_and_save(models: dict[str, Path], tmp_path: Path) -> None:
    for key in ("tied-bfloat16-1", "untied-float32-2"):
        model = resident_model(models[key], torch.float32)
        load_checkpoint_into_model(model, models[key])
        assert_model_holds(model, load_tensors(models[key]))
        save_model_tensors(model, tmp_path / f"{key}.safetensors")
        saved = load_file(str(tmp_path / f"{key}.safetensors"))
        # The tied lm_head is left out, as save_pretrained leaves it out.
        assert set(saved) == set(load_tensors(models[key]))
    model = resident_model(models["untied-float32-1"], torch.float32)
    load_checkpoint_into_model(model, models["untied-bfloat16-1"], dtype=torch.float16)
    expected = {
        k: v.to(torch.float16) for k, v in load_tensors(models["untied-bfloat16-1"]).items()
    }
    assert_model_holds(model, expected)


def test_architecture_is_built_once_when_passed_down(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = layout.architecture_segments
    monkeypatch.setattr(
        layout,
        "architecture_segments",
        lambda *args: calls.append(1) or original(*args),
    )
    a, b = models["untied-float32-1"], models["untied-float32-2"]
    model = resident_model(a, torch.float32)
    arch = layout.Architecture.for_config(model.config)
    for split_point in (0.1, 0.5, 0.9):
        merge_into_model(model, a, b, mix_ratio=0.5, split_point=split_point, arch=arch)
        merge_into_model(model, b, a, mix_ratio=0.5, split_point=split_point, arch=arch)
    assert len(calls) == 1  # the caller's one Architecture serves every pair


def test_errors_come_before_any_write(models: dict[str, Path]) -> None:
    a = models["untied-float32-1"]
    model = resident_model(a, torch.float32)
    load_checkpoint_into_model(model, a)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(M2N2ConfigError, match="different shapes"):
        merge_into_model(model, a, models["wide"], mix_ratio=0.5, split_point=0.5)
    with pytest.raises(M2N2ConfigError, match="mix_ratio"):
        merge_into_model(model, a, a, mix_ratio=1.5, split_point=0.5)
    with pytest.raises(M2N2ConfigError, match="granularity"):
        merge_into_model(model, a, a, mix_ratio=0.5, split_point=0.5, granularity="block")
    with pytest.raises(M2N2Error, match="not in"):  # an untied model, a tied parent: no lm_head
        merge_into_model(
            model,
            models["tied-float32-1"],
            models["tied-float32-2"],
            mix_ratio=0.5,
            split_point=0.5,
        )
    assert_model_holds(model, before)


@pytest.fixture(scope="module", autouse=True)
def mergekit_typed(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[MergekitRun, threading.Thread] | None]:
    """A real ``mergekit-yaml`` run (tied bf16 parents, dtype float32, out_dtype bfloat16),
    started before the first test so that its ~10 s of start-up overlap the others."""
    executable = mergekit_yaml_executable()
    if executable is None:
        yield None
        return
    a, b = models["tied-bfloat16-1"], models["tied-bfloat16-2"]
    config = m2n2_config(a, [a, b], mix_ratio=0.3, split_point=0.45)
    config.update(dtype="float32", out_dtype="bfloat16")
    run = MergekitRun(tmp_path_factory.mktemp("mergekit"), "typed", config)
    thread = threading.Thread(target=run.run, args=(executable,), daemon=True)
    thread.start()
    yield run, thread
    thread.join()


def test_mergekit_yaml_with_dtype_and_out_dtype(
    models: dict[str, Path],
    tmp_path: Path,
    mergekit_typed: tuple[MergekitRun, threading.Thread] | None,
) -> None:
    """The real ``mergekit-yaml``: tied bf16 parents, dtype float32, out_dtype bfloat16."""
    if mergekit_typed is None:
        pytest.skip("mergekit-yaml is not installed")
    run, thread = mergekit_typed
    thread.join()
    written = run.tensors()
    a, b = models["tied-bfloat16-1"], models["tied-bfloat16-2"]
    model = resident_model(a, torch.float32)
    child = merge_into_model(
        model,
        a,
        b,
        mix_ratio=0.3,
        split_point=0.45,
        dtype=torch.float32,
        out_dtype=torch.bfloat16,
    )
    assert_model_holds(model, written)
    save_child(model, child, tmp_path / "child.safetensors")
    saved = load_file(str(tmp_path / "child.safetensors"))
    assert set(saved) == set(written)
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(saved[name], tensor), name
    assert json.loads((run.out / "config.json").read_text())["tie_word_embeddings"]


def test_cached_parent_norms_follow_the_file(models: dict[str, Path], tmp_path: Path) -> None:
    """A parent's squared norms are remembered per file version: merging it again gives the same
    bits as mergekit, and a parent rewritten at the same path (an archive slot reused) is not
    merged with the old file's norms."""
    import shutil

    from m2n2_plugin.merge import kernel
    from m2n2_plugin.merge.models import save_tensors_atomic

    a = tmp_path / "a"
    shutil.copytree(models["untied-float32-1"], a)
    b = models["untied-float32-2"]
    model = resident_model(a, torch.float32)
    for _ in range(2):  # the second merge takes the cached norms
        merge_into_model(model, a, b, mix_ratio=0.3, split_point=0.6)
        assert_model_holds(model, reference(a, b, model.config, 0.3, 0.6))
    # Same path, other values (written to a new file and renamed, as evolve writes members).
    scaled = {k: v * 3.0 for k, v in load_file(a / "model.safetensors").items()}
    save_tensors_atomic(scaled, a / "model.safetensors")
    merge_into_model(model, a, b, mix_ratio=0.3, split_point=0.6)
    assert_model_holds(model, reference(a, b, model.config, 0.3, 0.6))
    # The cached value is the one cosine computes itself.
    x = torch.randn(3 * kernel.SUM_BLOCK + 7, generator=torch.Generator().manual_seed(0))
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    norms = (kernel.squared_norm(x), kernel.squared_norm(y))
    assert norms == kernel._partial_sums(x, y)[:2]
    assert norms[0] == pytest.approx(float(x.double().square().sum()), rel=1e-6)
    assert kernel.cosine(x, y, squared_norms=norms) == kernel.cosine(x, y)
