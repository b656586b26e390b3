"""Measure the mergekit method ``m2n2`` against mergekit's built-in ``slerp``, and the start-up
cost of the registration hook. Prints the figures; not a test.

1. Merge time: two random Llama-style models of ~110 M parameters (generated once into a cache
   folder outside the repository, default /tmp/m2n2-bench; weights are never committed) merged
   with ``merge_method: m2n2`` and with ``merge_method: slerp`` (same pair, same t), alternating,
   ``--repeats`` times each:
   a. the real ``mergekit-yaml`` command: wall clock and CPU time (user + system) of the process;
   b. ``mergekit.merge.run_merge`` in this process (no interpreter start-up in the figure).
   The ratios m2n2 / slerp of the medians are printed; the target is <= 1.05. On a shared
   machine, CPU time is the steadier figure: wall clock also measures the neighbours.
2. Start-up: ``python -c pass`` with the ``.pth`` hook active and with it switched off
   (``M2N2_NO_AUTOLOAD=1``: the ``.pth`` line still runs but imports nothing), alternating,
   ``--startup-repeats`` times; and ``import mergekit.merge_methods`` with and without the
   registration it triggers.

Usage::

    python benchmarks/bench_merge.py                       # everything, bf16 models
    python benchmarks/bench_merge.py --dtype float32 --repeats 5
    python benchmarks/bench_merge.py --skip-merge          # start-up figures only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# ~110 M parameters: 12 layers of 7.08 M (hidden 768, MLP 2048) + two 12.3 M embeddings
# (vocabulary 16,000, untied) + norms.
BENCH_CONFIG = {
    "vocab_size": 16000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def make_models(cache: Path, dtype: str) -> tuple[Path, Path, int]:
    """Two random models in ``cache`` (reused when already there); returns paths and size."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    paths = (cache / f"parent_a-{dtype}", cache / f"parent_b-{dtype}")
    config = LlamaConfig(**BENCH_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    n_params = 0
    for seed, path in enumerate(paths):
        if (path / "model.safetensors").exists():
            continue
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
        model.save_pretrained(path)
        n_params = sum(p.numel() for p in model.parameters())
        del model
    if not n_params:
        from safetensors import safe_open

        with safe_open(str(paths[0] / "model.safetensors"), "pt") as reader:
            n_params = sum(
                int(torch.Size(reader.get_slice(k).get_shape()).numel()) for k in reader.keys()
            )
    return paths[0], paths[1], n_params


def merge_configs(a: Path, b: Path) -> dict[str, dict]:
    models = [{"model": str(a)}, {"model": str(b)}]
    return {
        "m2n2": {
            "merge_method": "m2n2",
            "base_model": str(a),
            "models": models,
            "parameters": {"mix_ratio": 0.3, "split_point": 0.5},
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(a),
            "models": models,
            "parameters": {"t": 0.3},
        },
    }


def _summary(times: list[float]) -> str:
    spread = statistics.stdev(times) if len(times) > 1 else 0.0
    return f"median {statistics.median(times):7.3f} s  (min {min(times):.3f}, sd {spread:.3f})"


def alternate(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each runner ``repeats`` times, interleaved, so drifting load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):
        names = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in names:
            times[name].append(runners[name]())
    return times


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    run: Callable[[], None], cpu: Callable[[], float], sink: dict[str, list[float]], key: str
) -> float:
    """Run once; return wall seconds and record CPU seconds (user + system) under ``key``."""
    cpu0, wall0 = cpu(), time.perf_counter()
    run()
    wall = time.perf_counter() - wall0
    sink.setdefault(key, []).append(cpu() - cpu0)
    return wall


def report_pair(label: str, wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> float:
    """Print wall and CPU figures of m2n2 and slerp; return the CPU-time ratio."""
    for name in ("m2n2", "slerp"):
        print(f"{label} {name:5} wall: {_summary(wall[name])}  n={len(wall[name])}")
        print(f"{label} {name:5} CPU : {_summary(cpu[name])}")
    wall_ratio = statistics.median(wall["m2n2"]) / statistics.median(wall["slerp"])
    cpu_ratio = statistics.median(cpu["m2n2"]) / statistics.median(cpu["slerp"])
    print(
        f"{label} ratio m2n2 / slerp: wall {wall_ratio:.3f}, CPU {cpu_ratio:.3f}  (target <= 1.05)"
    )
    return cpu_ratio


Timings = tuple[dict[str, list[float]], dict[str, list[float]]]  # (wall, CPU) per method


def bench_cli(configs: dict[str, dict], work: Path, repeats: int) -> Timings:
    import yaml

    exe = Path(sys.executable).with_name("mergekit-yaml")
    command = str(exe) if exe.exists() else "mergekit-yaml"
    cpu: dict[str, list[float]] = {}

    def runner(name: str) -> Callable[[], float]:
        config_path = work / f"{name}.yml"
        config_path.write_text(yaml.safe_dump(configs[name]))
        out = work / f"out-{name}"
        args = [command, str(config_path), str(out), "--quiet", "--no-copy-tokenizer"]

        def run() -> float:
            shutil.rmtree(out, ignore_errors=True)
            return timed(
                lambda: subprocess.run(args, check=True, capture_output=True),
                _children_cpu,
                cpu,
                name,
            )

        return run

    wall = alternate({name: runner(name) for name in configs}, repeats)
    return wall, cpu


def bench_in_process(configs: dict[str, dict], work: Path, repeats: int) -> Timings:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    cpu: dict[str, list[float]] = {}

    def runner(name: str) -> Callable[[], float]:
        out = work / f"mem-{name}"

        def run() -> float:
            shutil.rmtree(out, ignore_errors=True)
            config = MergeConfiguration.model_validate(configs[name])
            return timed(
                lambda: run_merge(config, str(out), options), time.process_time, cpu, name
            )

        return run

    runners = {name: runner(name) for name in configs}
    for run in runners.values():  # warm-up: page cache, lazy imports
        run()
    cpu.clear()
    wall = alternate(runners, repeats)
    return wall, cpu


def bench_startup(repeats: int) -> dict[str, list[float]]:
    def runner(code: str, off: bool) -> Callable[[], float]:
        env = dict(os.environ)
        env.pop("M2N2_NO_AUTOLOAD", None)
        if off:
            env["M2N2_NO_AUTOLOAD"] = "1"

        def run() -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            return time.perf_counter() - start

        return run

    quick = alternate(
        {"hook on ": runner("pass", off=False), "hook off": runner("pass", off=True)},
        repeats,
    )
    code = "import mergekit.merge_methods"
    heavy = alternate(
        {
            "mergekit.merge_methods, registers m2n2 ": runner(code, off=False),
            "mergekit.merge_methods, no m2n2      ": runner(code, off=True),
        },
        max(3, repeats // 10),
    )
    return {**quick, **heavy}


def hook_is_installed() -> bool:
    probe = "import sys; print('m2n2_plugin' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "M2N2_NO_AUTOLOAD"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout.strip() == "True"


def import_time_us(code: str, module: str) -> int:
    """Cumulative import time (us) of ``module`` while running ``code``, from -X importtime."""
    env = {k: v for k, v in os.environ.items() if k != "M2N2_NO_AUTOLOAD"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in result.stderr.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) == 3 and fields[2] == module:
            return int(fields[1])
    return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/m2n2-bench"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup-repeats", type=int, default=40)
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw timings here")
    args = parser.parse_args()

    report: dict[str, object] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(f"python {report['python']}, {report['cpus']} CPUs, load {os.getloadavg()[0]:.2f}")

    if not args.skip_startup:
        print("\n== start-up cost of the registration hook ==")
        print(f"hook installed in this environment: {hook_is_installed()}")
        samples = [import_time_us("pass", "m2n2_plugin") for _ in range(5)]
        print(f"-X importtime, m2n2_plugin at start-up: median {statistics.median(samples)} us")
        samples = [
            import_time_us("import mergekit.merge_methods", "m2n2_plugin.merge.method")
            for _ in range(3)
        ]
        print(
            "-X importtime, registering m2n2 when mergekit.merge_methods is imported "
            f"(m2n2_plugin.merge.method): median {statistics.median(samples) / 1000:.0f} ms"
        )
        startup = bench_startup(args.startup_repeats)
        for name, times in startup.items():
            print(f"python -c {name}: {_summary(times)}  n={len(times)}")
        on, off = startup["hook on "], startup["hook off"]
        delta = statistics.median(on) - statistics.median(off)
        print(f"python -c pass, hook on - off (medians): {delta * 1000:+.1f} ms")
        keys = list(startup)[2:]
        reg = statistics.median(startup[keys[0]]) - statistics.median(startup[keys[1]])
        print(f"import mergekit.merge_methods, with - without m2n2: {reg * 1000:+.0f} ms")
        report["startup"] = startup

    if not args.skip_merge:
        print(f"\n== merge time, m2n2 vs slerp, {args.dtype} ==")
        args.cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        a, b, n_params = make_models(args.cache, args.dtype)
        print(f"models: {a} , {b}: {n_params / 1e6:.1f} M parameters each ", end="")
        print(f"(ready in {time.perf_counter() - start:.1f} s)")
        configs = merge_configs(a, b)
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            work = Path(tmp)
            cli = bench_cli(configs, work, args.repeats)
            report_pair("mergekit-yaml", *cli)
            mem = bench_in_process(configs, work, args.repeats)
            report_pair("run_merge    ", *mem)
        report.update(n_params=n_params, dtype=args.dtype, cli=cli, in_process=mem)

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
