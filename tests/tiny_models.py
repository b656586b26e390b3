"""Tiny Llama-style models and an offline tokenizer, built in code, for tests and examples.

Nothing here touches the network: the tokenizer is a ``tokenizers`` WordLevel model wrapped as
a ``PreTrainedTokenizerFast``, the models are ``LlamaForCausalLM`` built from a small config with
seeded random weights and saved with ``save_pretrained`` (safetensors) next to the tokenizer.

Every parameter is drawn afresh from the seed (norm weights too, around 1), so two models with
different seeds are genuinely different on every tensor: matrices are nearly orthogonal
(SLERP's spherical branch), norm vectors nearly parallel (mergekit's linear fallback).

Reuse::

    from tiny_models import make_tiny_llama
    path_a = make_tiny_llama(tmp_path / "a", seed=1)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
DEFAULT_WORDS = tuple("abcdefghijklmnopqrstuvwxyz") + tuple(str(d) for d in range(10))


def vocabulary_words(vocab_size: int) -> list[str]:
    """Words that, with the special tokens, fill a vocabulary of exactly ``vocab_size``."""
    count = vocab_size - len(SPECIAL_TOKENS)
    extra = [f"w{i}" for i in range(max(0, count - len(DEFAULT_WORDS)))]
    return [*DEFAULT_WORDS, *extra][:count]


def build_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``words`` plus ``<unk> <s> </s> <pad>``."""
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tiny_llama_config(
    *,
    vocab_size: int = 48,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """A ``LlamaConfig`` small enough to build, save and merge in milliseconds."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def random_tiny_llama(
    config: LlamaConfig | None = None, *, seed: int, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with every parameter drawn from ``seed``."""
    from transformers import LlamaForCausalLM

    config = config or tiny_llama_config()
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.01 * noise)
            else:
                param.copy_(0.05 * noise)
    return model.to(dtype)


def make_tiny_llama(
    path: str | os.PathLike[str],
    *,
    seed: int,
    config: LlamaConfig | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
) -> Path:
    """Save a seeded tiny Llama (safetensors) and, by default, the offline tokenizer, to ``path``.

    Returns ``path``.
    """
    path = Path(path)
    model = random_tiny_llama(config, seed=seed, dtype=dtype)
    model.save_pretrained(path)
    if tokenizer:
        build_tokenizer(vocabulary_words(model.config.vocab_size)).save_pretrained(path)
    return path


def save_as_pytorch_bin(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy a saved model to ``target`` with its weights as ``pytorch_model.bin`` (pickle).

    transformers 5 writes safetensors only; mergekit still reads ``.bin`` checkpoints (with
    ``--lazy-unpickle``), so tests that cover that path build one by hand.
    """
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tensors = load_tensors(source)
    torch.save(tensors, target / "pytorch_model.bin")
    for item in source.iterdir():
        if item.suffix == ".json" and not item.name.endswith(".index.json"):
            (target / item.name).write_bytes(item.read_bytes())
    return target


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a saved model (single or sharded safetensors, or ``pytorch_model.bin``)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(path / shard))
        return tensors
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    return torch.load(path / "pytorch_model.bin", weights_only=True)


# --------------------------------------------------------------------------------------------
# An independent reference for the m2n2 merge: plain numpy, written from the definition, with
# the tensor order spelled out by hand (mergekit's llama.json lists up_proj before gate_proj).

LLAMA_LAYER_TENSORS = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.up_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
)


def llama_tensor_order(num_layers: int, *, tied: bool) -> list[str]:
    """Tensor names of a Llama checkpoint in architecture order (a tied lm_head is absent)."""
    names = ["model.embed_tokens.weight"]
    for layer in range(num_layers):
        names += [f"model.layers.{layer}.{part}.weight" for part in LLAMA_LAYER_TENSORS]
    names.append("model.norm.weight")
    if not tied:
        names.append("lm_head.weight")
    return names


def llama_layer_boundaries(shapes: dict[str, tuple[int, ...]], num_layers: int) -> list[int]:
    """Offsets in the flat vector where layer 0..N-1 start, plus where the final norm starts."""
    order = llama_tensor_order(num_layers, tied=True)
    offsets, offset = {}, 0
    for name in order:
        offsets[name] = offset
        offset += int(np.prod(shapes[name]))
    starts = [offsets[f"model.layers.{i}.input_layernorm.weight"] for i in range(num_layers)]
    return [*starts, offsets["model.norm.weight"]]


def numpy_m2n2(
    parent_a: dict[str, np.ndarray],
    parent_b: dict[str, np.ndarray],
    order: Sequence[str],
    mix_ratio: float,
    split: int | Sequence[int],
) -> dict[str, np.ndarray]:
    """Split-point SLERP in float64: t = mix_ratio before flat index ``split``, else 1 - it
    (several splits: t = mix_ratio where an even number of them lie at or before the index).

    One angle per tensor; linear interpolation when |cos| > 0.9995 (mergekit's slerp rule).
    """
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in order:
        x = parent_a[name].astype(np.float64).ravel()
        y = parent_b[name].astype(np.float64).ravel()
        index = offset + np.arange(x.size)
        passed = sum(index >= s for s in (split if isinstance(split, Sequence) else [split]))
        t = np.where(passed % 2 == 0, mix_ratio, 1.0 - mix_ratio)
        norm_x = np.linalg.norm(x) if np.linalg.norm(x) > 1e-8 else 1.0
        norm_y = np.linalg.norm(y) if np.linalg.norm(y) > 1e-8 else 1.0
        cos = float(np.clip(np.dot(x, y) / (norm_x * norm_y), -1.0, 1.0))
        if abs(cos) > 0.9995:
            child = (1.0 - t) * x + t * y
        else:
            omega = np.arccos(cos)
            child = (np.sin((1.0 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)
        out[name] = child.reshape(parent_a[name].shape)
        offset += x.size
    return out


def as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 numpy copies (bf16 included, exactly)."""
    return {name: t.detach().to(torch.float64).cpu().numpy() for name, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# Running the real mergekit-yaml console script.


def mergekit_yaml_executable() -> str | None:
    """The ``mergekit-yaml`` script of this interpreter's environment (not a pyenv shim)."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("mergekit-yaml")
    return str(beside) if beside.exists() else shutil.which("mergekit-yaml")


class MergekitRun:
    """One ``mergekit-yaml CONFIG OUT [ARGS]`` run: config file, output folder, result."""

    def __init__(
        self,
        root: Path,
        name: str,
        config: dict,
        args: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        """``cwd``: where mergekit-yaml runs (relative model paths are resolved there)."""
        import yaml

        self.name = name
        self.config_path = root / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.out = root / f"out-{name}"
        self.args = tuple(args)
        self.cwd = cwd
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self, executable: str) -> MergekitRun:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("M2N2_NO_AUTOLOAD", None)
        env.setdefault("OMP_NUM_THREADS", "1")  # several run side by side on few cores
        command = [executable, str(self.config_path), str(self.out), *self.args]
        self.result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
            cwd=self.cwd,
        )
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The merged tensors; fails with mergekit's stderr if the run failed."""
        assert self.result is not None, "not run"
        assert self.result.returncode == 0, f"{self.name}:\n{self.result.stderr[-3000:]}"
        return load_tensors(self.out)


def run_all(runs: Sequence[MergekitRun], executable: str, workers: int = 3) -> None:
    """Run mergekit-yaml processes side by side (each spends seconds importing)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda run: run.run(executable), runs))


def m2n2_config(base: object | None, models: Sequence[object], **parameters: object) -> dict:
    """A ``merge_method: m2n2`` config dict (``base=None`` leaves ``base_model`` out)."""
    config: dict = {"merge_method": "m2n2", "models": [{"model": str(m)} for m in models]}
    if base is not None:
        config["base_model"] = str(base)
    config["parameters"] = parameters
    return config
