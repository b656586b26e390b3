"""A tiny `m2n2 evolve` workspace and the checks shared by the evolve, worker, crash and
bad-input tests.

The workspace holds random tiny Llamas (three alike, one wider, one with a permuted
vocabulary), a tiny GPT-2 (another architecture), a local multiple-choice lm-eval task and a
mergekit config naming three seeds. Everything is built offline in a few seconds.
``write_gsm_task`` adds a GSM8k-format generation task to a task folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from m2n2_plugin.example import write_jsonl

HERE = Path(__file__).resolve().parent
WORKER = HERE / "evolve_worker.py"
HUB_TESTS = HERE.parent / "hub_package" / "samplers" / "m2n2" / "tests"

MC_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
{extra}metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """\
task: tiny_bleu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: bleu
"""

# A GSM8k-format task: lm-eval's gsm8k prompt, filters and metric over local JSONL. Its own
# generation settings differ from those the tests pass in gen_kwargs, so an override shows.
GSM_TASK = """\
task: tiny_gsm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# Per-document results a task computes with its own Python code (lm-eval's !function).
TASK_CODE = """\
def out_of_range(doc, results):
    return {"acc": 2.0}


def not_a_number(doc, results):
    return {"acc": float("nan")}
"""


def build_model(vocab_size: int, seed: int, hidden: int):
    """A tiny 2-layer ``LlamaForCausalLM`` with a fixed initialisation: the workspace's seeds.

    Llama, the architecture most fine-tunes users merge have (the built-in example uses a
    GPT-2 for a reason of its own)."""
    import torch
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_workspace(root: Path) -> Path:
    """Models, tasks and a seeds config under ``root`` (returned)."""
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel

    from m2n2_plugin.example import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    for i in range(3):
        model = build_model(len(tok), seed=100 + i, hidden=32)
        model.save_pretrained(root / f"m{i}", safe_serialization=True)
        tok.save_pretrained(root / f"m{i}")
    wide = build_model(len(tok), seed=7, hidden=48)
    wide.save_pretrained(root / "wide", safe_serialization=True)
    tok.save_pretrained(root / "wide")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )
    gpt2.save_pretrained(root / "gpt2", safe_serialization=True)
    tok.save_pretrained(root / "gpt2")
    # Same shapes as m0, but two tokens trade ids: only the tokenizer check can tell.
    permuted = build_model(len(tok), seed=103, hidden=32)
    permuted.save_pretrained(root / "permuted", safe_serialization=True)
    tok.save_pretrained(root / "permuted")
    spec = json.loads((root / "permuted" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (root / "permuted" / "tokenizer.json").write_text(json.dumps(spec))

    rng = random.Random(0)
    rows = []
    for _ in range(40):
        word = "".join(rng.choice("abcdefgh") for _ in range(3))
        choices = [word[::-1], word, word[1:] + word[0], "".join(sorted(word))]
        rows.append({"question": f"reverse {word}", "choices": choices, "label": 0})
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "mc.jsonl"
    write_jsonl(data, rows)
    (tasks / "mc.yaml").write_text(MC_TASK.format(name="tiny_mc", data=data, extra=""))
    # Tasks whose own code yields bad per-document scores (a folder of its own: including a
    # task folder means trusting its code).
    custom = root / "custom_tasks"
    custom.mkdir(exist_ok=True)
    (custom / "utils.py").write_text(TASK_CODE)
    for fn in ("out_of_range", "not_a_number"):
        extra = f"process_results: !function utils.{fn}\n"
        task = MC_TASK.format(name=f"tiny_{fn}", data=data, extra=extra)
        (custom / f"{fn}.yaml").write_text(task)
    (custom / "bleu.yaml").write_text(GEN_TASK.format(data=data))
    (root / "seeds.yml").write_text(
        "merge_method: slerp\nbase_model: m0\nmodels:\n  - model: m0\n  - model: m1\n"
        "  - model: m2\nparameters:\n  t: 0.5\ndtype: float32\n"
    )
    return root


def write_gsm_task(tasks: Path) -> None:
    """The GSM8k-format task ``tiny_gsm`` in ``tasks``: nine sums, document 0 is "0+0"."""
    rows = [
        {"question": f"{a}+{b}", "answer": f"{a} plus {b}\n#### {a + b}"}
        for a in range(3)
        for b in range(3)
    ]
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "gsm.jsonl"
    write_jsonl(data, rows)
    (tasks / "gsm.yaml").write_text(GSM_TASK.format(data=data))


def config_dict(name: str, **overrides: Any) -> dict[str, Any]:
    """A small valid config; ``section__key=value`` overrides one key, ``section=...`` all."""
    cfg: dict[str, Any] = {
        "mergekit_config": "seeds.yml",
        "fitness": {
            "include_path": "tasks",
            "tasks": ["tiny_mc"],
            "metric": "acc",
            "fitness_docs": 30,
            "heldout_docs": 5,
            "batch_size": 16,
            "num_threads": 1,
        },
        "search": {"n_trials": 10, "archive_size": 4, "seed": 0, "heartbeat_interval": None},
        "output_dir": f"out-{name}",
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def write_config(root: Path, name: str, **overrides: Any) -> Path:
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config_dict(name, **overrides)))
    return path


def worker_env() -> dict[str, str]:
    """The environment of a worker subprocess: offline, one thread, quiet."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GIT_PYTHON_REFRESH": "quiet",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), *args]


def file_digests(folder: Path) -> dict[str, str]:
    """sha1 of every file under ``folder`` (relative names)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refold(trials: list[optuna.trial.FrozenTrial], archive_size: int) -> tuple[list, int]:
    """The archive recomputed from scratch in trial-number order (the hub tests' re-fold)."""
    sys.path.insert(0, str(HUB_TESTS))
    try:
        from m2n2_toy import refold as hub_refold
    finally:
        sys.path.remove(str(HUB_TESTS))
    import m2n2_plugin.hub as hub

    return hub_refold(hub, trials, archive_size)


def check_study_and_files(out: Path, study: optuna.Study, archive_size: int) -> Any:
    """The invariants of a study and its output folder once no worker is running.

    The archive has at most ``archive_size`` members, none twice; it is the re-fold of the
    trials in number order and every COMPLETE trial was folded exactly once; every child
    member has its file and no other file (of an evicted member, a failed trial or a cut-short
    write) is left in ``<out>/archive``. Returns the archive.
    """
    from m2n2_plugin.hub import M2N2Sampler

    from m2n2_plugin.search.workers import member_file

    trials = study.get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    arch = M2N2Sampler(archive_size=archive_size).archive(study)
    assert len(arch.members) <= archive_size
    assert len(set(arch.members)) == len(arch.members)
    slots, n_folded = refold(trials, archive_size)
    assert arch.slots == slots
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert arch.n_folded == n_folded == len(complete)
    assert arch.position == len(trials)
    seeds = {t.number for t in trials if "m2n2.seed" in t.user_attrs}
    children = sorted(set(arch.members) - seeds)
    for number in children:
        assert member_file(out, number).is_file(), number
    folder = out / "archive"
    left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert left == [member_file(out, n).name for n in children], (left, children)
    for number in arch.members:  # scores in the archive are the trials' own
        row = arch.scores[arch.members.index(number)]
        assert np.isclose(row.mean(), study.trials[number].value)
    return arch


def rebuild_lineage(out: Path, work: Path) -> list[dict[str, Any]]:
    """Rebuild ``out/best`` from its ``lineage.yml`` with mergekit's ``mergekit-multi``, check
    every tensor is the same, and return the lineage's merges (fails when there are none)."""
    import torch
    from safetensors.torch import load_file

    lineage = out / "best" / "lineage.yml"
    docs = [d for d in yaml.safe_load_all(lineage.read_text()) if d]
    assert docs, "the best model is a seed: this run has no merge to rebuild"
    command = [sys.executable, "-m", "mergekit.scripts.multimerge", str(lineage)]
    command += ["--intermediate-dir", str(work / "work"), "--out-path", str(work / "rebuilt")]
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    rebuilt = load_file(str(work / "rebuilt" / "model.safetensors"))
    best = load_file(str(out / "best" / "model.safetensors"))
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, best[name]), name
    return docs
