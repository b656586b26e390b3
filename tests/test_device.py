"""``fitness.device`` / ``--device``: checked up front, and the resident model built without init.

No test here needs a GPU: an absent device must fail in one line before anything is written
(this machine has no CUDA GPU and no MPS, which is what the tests use), and the resident model
is built where it will live without a random initialisation. The merge on a GPU itself is
checked by ``benchmarks/gpu_check.py`` on a machine that has one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from evolve_workspace import build_workspace
from evolve_workspace import write_config
from safetensors.torch import load_file
from tiny_models import make_tiny_llama
from tiny_models import tiny_llama_config
from transformers import AutoConfig

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.checkpoint import Checkpoint
from m2n2_plugin.merge.checkpoint import write_safetensors
from m2n2_plugin.merge.resident_model import build_resident_model
from m2n2_plugin.search.devices import resolve_device

NO_CUDA = not torch.cuda.is_available()
NO_MPS = not torch.backends.mps.is_available()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("device"))


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "cuda0", ""):
        with pytest.raises(M2N2Error, match="device must be cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_one_line(name: str) -> None:
    with pytest.raises(M2N2Error) as err:
        resolve_device(name)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"fitness.device is {name!r} but ")
    assert "use device: cpu" in message


@pytest.mark.skipif(not NO_MPS, reason="this machine has an MPS device")
def test_absent_mps_is_one_line() -> None:
    with pytest.raises(M2N2Error, match="'mps' but this machine has no usable MPS device"):
        resolve_device("mps")


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    from m2n2_plugin.cli import main

    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_cli_absent_device_exits_2_before_writing(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # From the config ...
    config = write_config(workspace, "cuda-config", fitness__device="cuda")
    code, err = _cli(["evolve", str(config), "--no-progress"], capsys)
    assert code == 2
    assert err == [
        "m2n2: error: fitness.device is 'cuda' but this torch was built without CUDA; "
        "use device: cpu or another machine"
    ] or (len(err) == 1 and "no CUDA GPU is visible" in err[0])
    assert not (workspace / "out-cuda-config").exists()
    # ... and from --device, which overrides a config that says cpu.
    config = write_config(workspace, "cuda-flag")
    code, err = _cli(["evolve", str(config), "--no-progress", "--device", "cuda:1"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("m2n2: error: fitness.device is 'cuda:1' but")
    assert not (workspace / "out-cuda-flag").exists()


def test_misspelt_device_is_a_config_error(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(workspace, "gpu-config", fitness__device="gpu")
    code, err = _cli(["evolve", str(config), "--no-progress"], capsys)
    assert code == 2
    assert len(err) == 1 and "fitness.device" in err[0] and "cuda:N" in err[0], err
    config = write_config(workspace, "gpu-flag")
    code, err = _cli(["evolve", str(config), "--no-progress", "--device", "gpu0"], capsys)
    assert code == 2
    assert err == ["m2n2: error: --device: device must be cpu, cuda, cuda:N or mps, got 'gpu0'"]
    assert not (workspace / "out-gpu-config").exists()
    assert not (workspace / "out-gpu-flag").exists()


def test_device_flag_reaches_the_resident_model(workspace: Path) -> None:
    """``--device cpu`` over a config that names another device: the run uses the flag's."""
    from m2n2_plugin.search.config import load_config
    from m2n2_plugin.search.config import with_device
    from m2n2_plugin.search.start import prepare

    cfg = load_config(write_config(workspace, "flag-cpu", fitness__device="cuda:7"))
    run = prepare(with_device(cfg, "cpu"))
    assert {p.device for p in run.model.parameters()} == {torch.device("cpu")}
    assert run.lm.device == torch.device("cpu")
    # The resident model starts as the first seed, bit for bit.
    with Checkpoint(run.seeds[0].path) as seed:
        state = run.model.state_dict()
        for name in seed.entries:
            assert torch.equal(state[name], seed.get(name)), name


@pytest.mark.parametrize("tied", [True, False])
def test_resident_model_is_built_without_random_init(
    tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An init made slow does not slow the build down; the model is the seed, bit for bit."""
    from transformers.models.llama import modeling_llama

    config = tiny_llama_config(num_hidden_layers=4, tie_word_embeddings=tied)
    seed = make_tiny_llama(tmp_path / "seed", seed=3, config=config, tokenizer=False)
    hf_config = AutoConfig.from_pretrained(seed)
    reference = modeling_llama.LlamaForCausalLM(hf_config)  # buffers as a normal build has them

    calls: list[str] = []
    original = modeling_llama.LlamaPreTrainedModel._init_weights

    def slow_init(self: torch.nn.Module, module: torch.nn.Module) -> None:
        calls.append(type(module).__name__)
        time.sleep(0.05)  # ~20 modules: a normal build would take > 1 s
        original(self, module)

    monkeypatch.setattr(modeling_llama.LlamaPreTrainedModel, "_init_weights", slow_init)
    # The patch is live: the plain transformers way pays for it.
    start = time.perf_counter()
    modeling_llama.LlamaForCausalLM(hf_config)
    assert time.perf_counter() - start > 0.5 and calls
    calls.clear()

    start = time.perf_counter()
    model = build_resident_model(hf_config, seed, dtype=torch.float32)
    assert time.perf_counter() - start < 0.5
    assert calls == []
    state = model.state_dict()
    with Checkpoint(seed) as ckpt:
        for name in ckpt.entries:
            assert torch.equal(state[name], ckpt.get(name)), name
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared is tied
    # Buffers that are in no checkpoint (rotary inv_freq) are what a normal build computes.
    buffers = dict(reference.named_buffers())
    assert buffers
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert not model.training


def test_resident_model_in_bfloat16_holds_the_seed_cast(tmp_path: Path) -> None:
    config = tiny_llama_config(num_hidden_layers=2)
    seed = make_tiny_llama(tmp_path / "seed", seed=4, config=config, tokenizer=False)
    model = build_resident_model(
        AutoConfig.from_pretrained(seed), seed, dtype=torch.bfloat16, weights_dtype=torch.float16
    )
    with Checkpoint(seed) as ckpt:
        for name, tensor in model.state_dict().items():
            if name in ckpt.entries:
                expected = ckpt.get(name).to(torch.float16).to(torch.bfloat16)
                assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected), name


def test_streamed_safetensors_file_reads_back(tmp_path: Path) -> None:
    """The one-tensor-at-a-time writer (used for a model on a GPU) writes a valid file."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(3, generator=g),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "strided": torch.randn(4, 6, generator=g).t(),
    }
    path = tmp_path / "x.safetensors"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_safetensors(tensors, fd)
    finally:
        os.close(fd)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with Checkpoint(path) as ckpt:  # our reader too
        for name, tensor in tensors.items():
            assert torch.equal(ckpt.get(name), tensor), name
