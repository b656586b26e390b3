"""``m2n2 evolve`` on a GPU, end to end, with ~1 B-parameter seeds: nothing is downloaded.

What it does, in a work folder (a temporary one unless ``--workdir``):

1. Two random Llama-architecture seeds in bfloat16 that share a "base": every tensor is
   ``base + 0.1 * base.std() * noise`` with a different noise per seed, so the two are close
   (cos ~0.99, as two fine-tunes of one model) and a merge of them is a real interpolation.
   Default size: hidden 2048, 22 layers, MLP 5632, vocabulary 32000 (TinyLlama's shape, ~1.1 B
   parameters, 2.2 GB per seed). Tensors are made on the device and written one at a time.
2. A synthetic generation task (local JSONL + an lm-eval YAML: "reverse these words",
   ``generate_until``, ``exact_match``) and a word-level tokenizer built in code.
3. ``m2n2 evolve`` (the library's ``evolve``, i.e. the command's code) with ``device`` set to
   the device asked for, ``--trials`` trials (20), held-out documents and ``best/`` export.
4. Checks: every parameter of the resident model is on the device; a child merged on the device
   (``merge_into_model`` into the resident model) equals the CPU merge of the same parents
   (``merge_checkpoints``) within bfloat16 tolerance (one bfloat16 rounding step; on the CPU
   itself: bit for bit).
5. Prints per-trial merge / load / evaluate / save seconds, their medians and
   (merge + load) / evaluate, the peak GPU memory (``torch.cuda.max_memory_allocated``) against
   the model's size, and the peak host RSS (``ru_maxrss``) during the evolution.

Usage::

    python benchmarks/gpu_check.py                       # CUDA, ~1 B parameters, 20 trials
    python benchmarks/gpu_check.py --device cuda:1
    python benchmarks/gpu_check.py --device cpu --tiny   # checks the script itself on a CPU

Exit status: 0 when every check passed, 1 when one failed, 2 when the device is absent
(one line, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


FULL = Size(hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
TINY = Size(hidden=64, layers=3, intermediate=128, heads=4, kv_heads=2, vocab=300)

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
N_LETTERS = 12  # the task's words: l0 .. l11

TASK_YAML = """\
task: reverse_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: reverse {{{{question}}}} A:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Q:"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def fail(message: str, code: int = 1) -> None:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    sys.exit(code)


def build_tokenizer(vocab_size: int) -> Any:
    """A whitespace word-level tokenizer with exactly ``vocab_size`` tokens (no download)."""
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"l{i}" for i in range(N_LETTERS)] + ["Q:", "A:", "reverse"]
    words += [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(words))]
    vocab = {token: i for i, token in enumerate((*SPECIALS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def llama_config(size: Size) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def build_seeds(root: Path, size: Size, device: Any, tokenizer: Any) -> tuple[list[Path], int]:
    """Two seeds sharing a random base, written tensor by tensor; returns (folders, params)."""
    import torch
    from transformers import LlamaForCausalLM

    from m2n2_plugin.merge.checkpoint import write_safetensors

    config = llama_config(size)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    n_params = sum(p.numel() for p in skeleton.parameters())
    folders = [root / "seed_a", root / "seed_b"]
    base_gen = torch.Generator(device=device)
    for seed, folder in enumerate(folders, start=1):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # The same base stream for both seeds (regenerated), its own noise per seed; each
        # tensor is written as soon as it is made, so one tensor is in memory at a time.
        base_gen.manual_seed(0)
        noise = torch.Generator(device=device).manual_seed(seed)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                base = torch.ones(shape, device=device)
            else:
                base = torch.randn(shape, generator=base_gen, device=device) * 0.02
            step = torch.randn(shape, generator=noise, device=device) * 0.1 * base.std()
            fd = os.open(folder / f"{name}.part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                write_safetensors({name: (base + step).to(torch.bfloat16)}, fd)
            finally:
                os.close(fd)
        _join_parts(folder, list(shapes))
    return folders, n_params


def _join_parts(folder: Path, names: list[str]) -> None:
    """Join the one-tensor files into ``model.safetensors`` (header rebuilt, bytes copied)."""
    import struct

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    parts = []
    offset = 0
    for name in names:
        part = folder / f"{name}.part"
        with part.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            info = json.loads(fh.read(length))[name]
        size = info["data_offsets"][1]
        header[name] = {**info, "data_offsets": [offset, offset + size]}
        parts.append((part, 8 + length, size))
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with (folder / "model.safetensors").open("wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for part, start, _size in parts:
            with part.open("rb") as fh:
                fh.seek(start)
                shutil.copyfileobj(fh, out, 16 << 20)
            part.unlink()


def write_task(root: Path, n_docs: int, max_gen_toks: int) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n_docs):
        words = [f"l{rng.randrange(N_LETTERS)}" for _ in range(3)]
        rows.append({"question": " ".join(words), "answer": " ".join(reversed(words))})
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "reverse.yaml").write_text(TASK_YAML.format(data=data, max_gen_toks=max_gen_toks))
    return tasks


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def compare_merges(run: Any, seeds: list[Path], exact: bool) -> tuple[float, float, int]:
    """Merge seed A x seed B into the resident model (on its device) and on the CPU.

    Returns (largest difference in bfloat16 steps, fraction of elements bit-equal, tensors).
    """
    import torch

    from m2n2_plugin.merge.resident import merge_checkpoints
    from m2n2_plugin.merge.resident import merge_into_model

    params = {"mix_ratio": 0.37, "split_point": 0.61}
    merge_into_model(run.model, seeds[0], seeds[1], **params, arch=run.arch, scratch=run.scratch)
    on_device = run.model.state_dict()
    cpu = merge_checkpoints(seeds[0], seeds[1], config=run.model.config, **params, arch=run.arch)
    worst_steps = 0.0
    equal = total = 0
    for name, expected in cpu.items():
        got = on_device[name].detach().to("cpu")
        expected = expected.to(got.dtype)
        if exact and not torch.equal(got, expected):
            fail(f"tensor {name}: the resident merge differs from the CPU merge (same device)")
        diff = (got.float() - expected.float()).abs()
        # One bfloat16 rounding step at each element's magnitude (2^-7 relative).
        step = expected.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny) * 2.0**-7
        worst_steps = max(worst_steps, float((diff / step).max()))
        equal += int((got == expected).sum())
        total += got.numel()
    return worst_steps, equal / total, len(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or mps (default cuda)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (checks the script)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--docs", type=int, default=64, help="fitness documents")
    p.add_argument("--heldout", type=int, default=16, help="held-out documents")
    p.add_argument("--gen-tokens", type=int, default=16, help="max_gen_toks of the task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    args = p.parse_args()

    import torch

    from m2n2_plugin.errors import M2N2Error
    from m2n2_plugin.search.devices import resolve_device

    try:  # before anything is written
        device = resolve_device(args.device, what="--device")
    except M2N2Error as exc:
        fail(str(exc), code=2)
    size = TINY if args.tiny else FULL
    root = args.workdir or Path(tempfile.mkdtemp(prefix="m2n2-gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    on_cuda = device.type == "cuda"
    print(f"device {device}; work folder {root}")

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(size.vocab)
    seeds, n_params = build_seeds(root, size, device, tokenizer)
    write_task(root, args.docs + args.heldout, args.gen_tokens)
    model_gb = n_params * 2 / 1e9
    print(
        f"seeds: {n_params / 1e6:,.1f} M parameters, {model_gb:.2f} GB each in bfloat16 "
        f"(built in {time.perf_counter() - t0:.1f} s)"
    )

    import yaml

    config = {
        "mergekit_config": {
            "merge_method": "slerp",
            "base_model": str(seeds[0]),
            "models": [{"model": str(s)} for s in seeds],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        },
        "fitness": {
            "include_path": "tasks",
            "tasks": ["reverse_words"],
            "metric": "exact_match",
            "fitness_docs": args.docs,
            "heldout_docs": args.heldout,
            "batch_size": args.batch_size,
            "dtype": "bfloat16",
            "device": args.device,
        },
        "search": {
            "n_trials": args.trials,
            "archive_size": 8,
            "seed": 0,
            "heartbeat_interval": None,
            "early_rejection": False,  # every child is evaluated in full: comparable timings
        },
        "output_dir": "out",
    }
    config_path = root / "evolve.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    from m2n2_plugin.search.evolve import evolve

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    checked: dict[str, Any] = {}
    rows: list[tuple[int, str, dict[str, float]]] = []

    def on_trial(run: Any, frozen: Any) -> None:
        if not checked:
            places = {t.device for t in run.model.parameters()}
            places |= {t.device for t in run.model.buffers()}
            checked["places"] = places
            checked["lm_device"] = run.lm.device
        kind = "seed" if "m2n2.seed" in frozen.user_attrs else "child"
        rows.append((frozen.number, kind, frozen.user_attrs.get("m2n2.timing", {})))

    t0 = time.perf_counter()
    try:
        run = evolve(config_path, progress=False, on_trial=on_trial)
    except M2N2Error as exc:
        fail(f"m2n2 evolve failed: {exc}")
    evolve_s = time.perf_counter() - t0
    rss_evolve = peak_rss_gb()
    gpu_peak = torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else None
    gpu_rest = torch.cuda.memory_allocated(device) / 1e9 if on_cuda else None

    ok = True
    if checked.get("places") != {device}:
        print(f"FAIL: resident model tensors on {checked.get('places')}, expected {device}")
        ok = False
    else:
        print(f"ok: every resident parameter and buffer is on {device}")
    if checked.get("lm_device") != device:
        print(f"FAIL: lm-eval's model device is {checked.get('lm_device')}")
        ok = False
    if not (run.out / "best" / "config.json").is_file():
        print("FAIL: no best/ model folder")
        ok = False

    print(f"\n{'trial':>5} {'kind':>5} {'merge s':>8} {'load s':>7} {'eval s':>7} {'save s':>7}")
    for number, kind, t in rows:
        print(
            f"{number:>5} {kind:>5} {t.get('merge', 0):>8.3f} {t.get('load', 0):>7.3f} "
            f"{t.get('evaluate', 0):>7.3f} {t.get('save', 0):>7.3f}"
        )
    children = [t for _, kind, t in rows if kind == "child"]
    if children:
        merge = statistics.median(t["merge"] for t in children)
        evaluate = statistics.median(t["evaluate"] for t in children)
        print(
            f"children: median merge {merge:.3f} s, evaluate {evaluate:.3f} s, "
            f"(merge + load) / evaluate = {merge / evaluate:.1%} (target <= 5 %)"
        )
    seeds_load = [t["load"] for _, kind, t in rows if kind == "seed"]
    if seeds_load:
        print(f"seeds: median load {statistics.median(seeds_load):.3f} s")
    print(f"evolve: {evolve_s:.1f} s for {len(rows)} trials (held-out + best/ included)")
    if gpu_peak is not None:
        print(
            f"peak GPU memory {gpu_peak:.2f} GB = {gpu_peak / model_gb:.2f} models "
            f"(model {model_gb:.2f} GB; lm-eval's own working memory included); "
            f"{gpu_rest:.2f} GB allocated at rest (model + scratch)"
        )
    print(
        f"peak host RSS during the evolution {rss_evolve:.2f} GB ({rss_evolve / model_gb:.2f} "
        "models)"
    )

    worst, equal, n = compare_merges(run, seeds, exact=device.type == "cpu")
    line = (
        f"{n} tensors, {equal:.2%} of elements bit-equal, largest difference "
        f"{worst:.2f} bfloat16 steps"
    )
    if worst <= 1.0:
        print(f"ok: merge on {device} == CPU merge within bfloat16 tolerance ({line})")
    else:
        print(f"FAIL: merge on {device} differs from the CPU merge ({line})")
        ok = False
    summary = json.loads((run.out / "summary.json").read_text())
    print(f"best trial {summary.get('best_trial')}, held-out {summary.get('heldout', {})}")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
