"""Curves (PNG) and tables (Markdown, CSV) from the JSON records that run.py writes.

    python examples/digits/plot.py                      # all of examples/digits/results/
    python examples/digits/plot.py --docs docs/digits.md   # also refresh the doc's tables

Curves: test accuracy of the best-training-accuracy archive member against children
evaluated, mean +- standard deviation over the seeds that ran (population std), one PNG per
(dataset, setting). The paper's read-off values are drawn as hollow markers at 10k / 50k.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

LABELS = {
    "m2n2": "M2N2",
    "no_attraction": "M2N2 without attraction",
    "no_split": "M2N2 without split point",
    "no_crossover": "M2N2 without crossover (mutation only)",
    "ga": "GA (alpha 0)",
    "cmaes": "CMA-ES (separable)",
    "bruteforce": "brute-force SLERP ratio",
}
ORDER = list(LABELS)
#: Test accuracy (%) read off the official figure (spec, +-1 point); None where not reported.
PAPER: dict[tuple[str, str], dict[int, float]] = {
    ("scratch", "m2n2"): {10_000: 82.5, 50_000: 87.0},
    ("scratch", "cmaes"): {10_000: 80.0, 50_000: 86.0},
    ("scratch", "no_crossover"): {10_000: 62.0, 50_000: 77.0},
    ("scratch", "ga"): {10_000: 64.0, 50_000: 68.0},
    ("pretrained", "m2n2"): {10_000: 68.5},
    ("pretrained", "no_attraction"): {10_000: 66.0},
    ("pretrained", "no_split"): {10_000: 57.7},
    ("pretrained", "bruteforce"): {10_000: 57.7},
    ("pretrained", "ga"): {10_000: 52.0},
}
CHECKPOINTS = {
    ("digits", "scratch"): (10_000, 50_000),
    ("digits", "pretrained"): (1_000, 10_000),
    ("mnist", "scratch"): (10_000, 20_000),
    ("mnist", "pretrained"): (1_000, 10_000),
}
TABLE_START = "<!-- digits-table:start -->"
TABLE_END = "<!-- digits-table:end -->"


@dataclass
class Group:
    """All seeds of one (dataset, setting, method)."""

    dataset: str
    setting: str
    method: str
    records: list[dict]

    def at(self, k: int) -> list[float]:
        """Each seed's test accuracy at ``k`` children (the last logged point at or before)."""
        out = []
        for rec in self.records:
            xs = np.asarray(rec["curve"]["children"])
            ys = np.asarray(rec["curve"]["test_acc"])
            if xs[-1] < k:
                continue
            out.append(float(ys[np.searchsorted(xs, k, side="right") - 1]))
        return out


def load_groups(results: Path) -> list[Group]:
    groups = []
    for run_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        for method_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            recs = [json.loads(f.read_text()) for f in sorted(method_dir.glob("seed*.json"))]
            if recs:
                groups.append(Group(recs[0]["dataset"], recs[0]["setting"], method_dir.name, recs))
    groups.sort(key=lambda g: (g.dataset, g.setting, ORDER.index(g.method)))
    return groups


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f} ± {arr.std():.1f}"


def table_rows(groups: list[Group]) -> list[dict[str, str]]:
    rows = []
    for g in groups:
        paper = PAPER.get((g.setting, g.method), {}) if g.dataset == "digits" else {}
        ck = CHECKPOINTS[(g.dataset, g.setting)]
        seeds = sorted(r["seed"] for r in g.records)
        row = {
            "dataset": g.dataset,
            "setting": g.setting,
            "method": LABELS[g.method],
            "seeds": f"{len(seeds)} ({_seed_text(seeds)})",
        }
        for k in ck:
            row[f"test @{k // 1000}k (%)"] = _fmt(g.at(k))
            row[f"paper @{k // 1000}k (%)"] = f"{paper[k]:g}" if k in paper else "—"
        cps = [r["children_per_s"] for r in g.records]
        row["children/s"] = f"{np.mean(cps):.0f}"
        rows.append(row)
    return rows


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def markdown(rows: list[dict[str, str]]) -> str:
    """One Markdown table per (dataset, setting): their checkpoint columns differ."""
    out = []
    keys = sorted({(r["dataset"], r["setting"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for dataset, setting in keys:
        sub = [r for r in rows if (r["dataset"], r["setting"]) == (dataset, setting)]
        cols = [c for c in sub[0] if c not in ("dataset", "setting")]
        out.append(f"**{dataset}, {'from scratch' if setting == 'scratch' else 'pre-trained'}**")
        out.append("")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        for r in sub:
            out.append("| " + " | ".join(r[c] for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def speed_table(groups: list[Group]) -> str:
    """Wall time, children/s and time shares per (setting, method), averaged over the runs.

    The machine is shared, so wall-clock speed moves with its load: the table also gives the
    rate per CPU-second of the run's own process and the 1-minute load average at the end.
    """
    lines = [
        "| dataset, setting | method | runs | children | wall (s) | children/s "
        "| children per CPU-s | load avg "
        "| sampler + Optuna (CMA-ES: ask + tell) | crossover + mutation | evaluation | logging |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        walls = [r["wall_s"] for r in g.records]
        per_cpu = [r["children_per_cpu_s"] for r in g.records if "children_per_cpu_s" in r]
        loads = [
            r["host"]["load_avg_1min_at_end"]
            for r in g.records
            if "load_avg_1min_at_end" in r["host"]
        ]
        shares = {
            k: np.mean([r["time_s"][k] / r["wall_s"] for r in g.records])
            for k in g.records[0]["time_s"]
        }
        lines.append(
            f"| {g.dataset}, {g.setting} | {LABELS[g.method]} | {len(g.records)} "
            f"| {g.records[0]['children']:,} | {np.mean(walls):.0f} "
            f"| {np.mean([r['children_per_s'] for r in g.records]):.0f} "
            f"| {f'{np.mean(per_cpu):.0f}' if per_cpu else '—'} "
            f"| {f'{np.mean(loads):.1f}' if loads else '—'} "
            + " ".join(
                f"| {100 * shares[k]:.0f} %"
                for k in ("sampler_and_optuna", "crossover", "evaluation", "logging")
            )
            + " |"
        )
    return "\n".join(lines)


def plot(groups: list[Group], results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = dict(zip(ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for dataset, setting in sorted({(g.dataset, g.setting) for g in groups}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for g in (g for g in groups if (g.dataset, g.setting) == (dataset, setting)):
            top = min(r["curve"]["children"][-1] for r in g.records)
            grid = np.linspace(0, top, 201)
            ys = np.stack(
                [
                    np.interp(grid, r["curve"]["children"], r["curve"]["test_acc"])
                    for r in g.records
                ]
            )
            mean, std = 100 * ys.mean(axis=0), 100 * ys.std(axis=0)
            c = colors[g.method]
            ax.plot(grid, mean, color=c, label=f"{LABELS[g.method]} (n={len(g.records)})")
            ax.fill_between(grid, mean - std, mean + std, color=c, alpha=0.2, lw=0)
            if dataset == "digits":
                for k, v in PAPER.get((setting, g.method), {}).items():
                    ax.plot(k, v, marker="o", mfc="none", mec=c, ms=8)
        ax.set_xlabel("children evaluated")
        ax.set_ylabel("test accuracy (%) of the best-training member")
        name = "from scratch" if setting == "scratch" else "from two pre-trained specialists"
        ax.set_title(f"{dataset}, {name} (hollow markers: paper)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = results / f"{dataset}_{setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def replace_block(doc: Path, body: str) -> None:
    text = doc.read_text()
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no {TABLE_START} ... {TABLE_END} block")
    doc.write_text(pattern.sub(lambda _: f"{TABLE_START}\n{body}\n{TABLE_END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=None, help="Markdown file to update")
    args = parser.parse_args(argv)
    groups = load_groups(args.results)
    rows = table_rows(groups)
    with open(args.results / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    body = markdown(rows) + "\n**Speed** (this machine, as measured in these runs)\n\n"
    body += speed_table(groups) + "\n"
    (args.results / "summary.md").write_text(body)
    for path in plot(groups, args.results):
        print("wrote", path)
    if args.docs is not None:
        replace_block(args.docs, body)
        print("updated", args.docs)
    print(body)


if __name__ == "__main__":
    main()
