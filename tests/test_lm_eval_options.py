"""lm-eval's own options pass through the fitness section, under lm-eval's names (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from evolve_workspace import build_model
from evolve_workspace import write_gsm_task

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.example import build_tokenizer
from m2n2_plugin.search.config import parse_config

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("opts")
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    for i in range(2):
        build_model(len(tok), seed=200 + i, hidden=32).save_pretrained(root / f"s{i}")
        tok.save_pretrained(root / f"s{i}")
    write_gsm_task(root / "tasks")
    return root


def config(folder: Path, **fitness: object) -> dict:
    return {
        "mergekit_config": {
            "merge_method": "slerp",
            "base_model": "s0",
            "models": [{"model": "s0"}, {"model": "s1"}],
            "parameters": {"t": 0.5},
            "dtype": "float32",
        },
        "fitness": {
            "include_path": "tasks",
            "tasks": ["tiny_gsm"],
            "metric": "exact_match",
            "filter": "strict-match",
            "fitness_docs": 6,
            "heldout_docs": 3,
            "num_threads": 1,
            **fitness,
        },
        "search": {"n_trials": 4, "archive_size": 3, "heartbeat_interval": None},
        "output_dir": "out-" + "-".join(sorted(fitness)),
    }


def test_gsm8k_format_with_gen_kwargs_and_chat_template(folder: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = parse_config(
        config(
            folder,
            gen_kwargs={"max_gen_toks": 5, "until": ["\n"], "do_sample": False},
            apply_chat_template=True,
            system_instruction="Answer with #### and a number.",
            fewshot_as_multiturn=False,
            num_fewshot=0,
            batch_size=4,
            dtype="float32",
        ),
        base_dir=folder,
    )
    run = evolve(cfg, progress=False)
    assert len(run.study.trials) == 4
    assert run.fitness.options["apply_chat_template"] is True
    # The effective generation settings are logged with the study, merged over the task's.
    logged = run.study.user_attrs["m2n2.generation_settings"]["tiny_gsm"]
    assert logged["generation_kwargs"]["max_gen_toks"] == 5
    assert logged["generation_kwargs"]["until"] == ["\n"]
    assert logged["generation_kwargs"]["do_sample"] is False
    # The prompts lm-eval built really went through the chat template with the system turn.
    from lm_eval.evaluator import evaluate

    task = run.fitness._loaded["tasks"]["tiny_gsm"]
    res = evaluate(
        run.lm,
        {"tasks": {"tiny_gsm": task}, "groups": {}, "group_map": {}},
        samples={"tiny_gsm": [0]},
        log_samples=True,
        bootstrap_iters=0,
        **run.fitness.options,
    )
    arguments = res["samples"]["tiny_gsm"][0]["arguments"]
    prompt = arguments[0][0] if isinstance(arguments, list) else arguments["gen_args_0"]["arg_0"]
    assert prompt.startswith("s: Answer with #### and a number.\nu: Question: 0+0")
    assert prompt.endswith("a:")


def test_unknown_lm_eval_option_lists_the_accepted_ones(folder: Path) -> None:
    with pytest.raises(M2N2Error) as err:
        parse_config(config(folder, max_new_tokens=5), base_dir=folder)
    message = str(err.value)
    assert "unknown key 'fitness.max_new_tokens'" in message
    for accepted in ("gen_kwargs", "apply_chat_template", "system_instruction", "num_fewshot"):
        assert accepted in message
    # And it is what a user writes in YAML: the same error from a file.
    path = folder / "bad.yml"
    path.write_text(yaml.safe_dump(config(folder, max_new_tokens=5)))
    from m2n2_plugin.search.config import load_config

    with pytest.raises(M2N2Error, match="accepted: apply_chat_template"):
        load_config(path)


GROUP = """\
group: tiny_pair
task:
  - tiny_gsm_b
  - tiny_gsm
aggregate_metric_list:
  - metric: exact_match
    aggregation: mean
"""


@pytest.fixture(scope="module")
def two_folders(folder: Path) -> Path:
    """A second task folder: a copy of tiny_gsm (as tiny_gsm_b, marked unsafe) and a group."""
    other = folder / "more_tasks"
    other.mkdir(exist_ok=True)
    text = (folder / "tasks" / "gsm.yaml").read_text()
    unsafe = text.replace("task: tiny_gsm", "task: tiny_gsm_b") + "unsafe_code: true\n"
    (other / "gsm_b.yaml").write_text(unsafe)
    (other / "pair.yaml").write_text(GROUP)
    return other


def test_lm_eval_options_as_users_write_them(folder: Path, two_folders: Path) -> None:
    """model_args and gen_kwargs as lm-eval strings, a group over two include folders, the
    unsafe-code flag, and the per-sample log of the best model's held-out documents."""
    import json

    from m2n2_plugin.search.evolve import evolve

    cfg = config(
        folder,
        include_path=["tasks", str(two_folders)],
        tasks=["tiny_pair"],
        fitness_docs=3,
        heldout_docs=2,
        model_args="max_length=96,add_bos_token=True",
        gen_kwargs="max_gen_toks=6,do_sample=False",
        confirm_run_unsafe_code=True,
    )
    cfg["search"]["n_trials"] = 3
    run = evolve(parse_config(cfg, base_dir=folder), progress=False)
    assert run.lm.max_length == 96 and run.lm.add_bos_token is True
    logged = run.study.user_attrs["m2n2.generation_settings"]
    # The group's subtasks, in the group's order, each scored on its own documents.
    assert list(logged) == ["tiny_gsm_b", "tiny_gsm"]
    assert all(s["generation_kwargs"]["max_gen_toks"] == 6 for s in logged.values())
    assert all(s["generation_kwargs"]["do_sample"] is False for s in logged.values())
    labels = run.study.user_attrs["m2n2.fitness_labels"]
    assert labels == [f"{t}:{i}" for t in ("tiny_gsm_b", "tiny_gsm") for i in range(3)]
    assert run.fitness.options["confirm_run_unsafe_code"] is True
    # lm-eval's own per-sample records of the best model's held-out documents.
    rows = [
        json.loads(line)
        for line in (run.out / "heldout_samples.jsonl").read_text().split("\n")
        if line
    ]
    assert [(r["task"], r["doc_id"]) for r in rows] == [
        (t, i) for t in ("tiny_gsm_b", "tiny_gsm") for i in (3, 4)
    ]
    summary = json.loads((run.out / "summary.json").read_text())
    best = summary["heldout"]["M2N2 best"]
    for task in ("tiny_gsm_b", "tiny_gsm"):
        scores = [r["exact_match"] for r in rows if r["task"] == task]
        assert sum(scores) / len(scores) == pytest.approx(best[task])
    for row in rows:
        assert row["filter"] == "strict-match"
        assert "####" in row["target"]  # the document's answer
        assert isinstance(row["filtered_resps"][0], str)  # what the model answered, filtered
        assert isinstance(row["resps"][0][0], str)  # ... and its raw generation


def test_unsafe_task_needs_the_flag(folder: Path, two_folders: Path) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = config(folder, include_path=["tasks", str(two_folders)], tasks=["tiny_gsm_b"])
    with pytest.raises(M2N2Error, match="set fitness.confirm_run_unsafe_code: true"):
        evolve(parse_config(cfg, base_dir=folder), progress=False)


@pytest.mark.parametrize(
    ("model_args", "reason"),
    [
        ("peft=adapter", "'peft' cannot be used (it applies when lm-eval loads a model"),
        ({"device": "cuda"}, "'device' cannot be used (set fitness.device"),
        ("dtype=bfloat16", "'dtype' cannot be used (set fitness.dtype"),
        ("max_lenght=5", "'max_lenght' cannot be used (not an lm-eval HFLM option"),
    ],
)
def test_model_args_refused_by_name(folder: Path, model_args: object, reason: str) -> None:
    from m2n2_plugin.search.evolve import evolve

    cfg = config(folder, model_args=model_args)
    with pytest.raises(M2N2Error, match=re.escape(f"fitness.model_args: {reason}")):
        evolve(parse_config(cfg, base_dir=folder), progress=False)
    assert not (folder / cfg["output_dir"]).exists()


def test_benchmark_test_split_warning(
    folder: Path, two_folders: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fitness documents from gsm8k's test split: said at start, in the card and summary."""
    import json
    import logging

    from m2n2_plugin.search.evolve import evolve

    bench = folder / "bench_tasks"
    bench.mkdir(exist_ok=True)
    text = (folder / "tasks" / "gsm.yaml").read_text()
    (bench / "gsm8k_local.yaml").write_text(text.replace("task: tiny_gsm", "task: gsm8k_local"))
    cfg = config(folder, include_path=[str(bench)], tasks=["gsm8k_local"], fitness_docs=3)
    cfg["search"]["n_trials"] = 2
    with caplog.at_level(logging.WARNING, logger="m2n2"):
        run = evolve(parse_config(cfg, base_dir=folder), progress=False)
    said = [r.getMessage() for r in caplog.records if "well-known benchmark" in r.getMessage()]
    assert len(said) == 1
    assert "gsm8k_local (gsm8k, split 'test')" in said[0]
    card = (run.out / "best" / "README.md").read_text()
    assert "**Warning:** the fitness documents come from a well-known benchmark's test" in card
    summary = json.loads((run.out / "summary.json").read_text())
    assert summary["warnings"] == [said[0].removeprefix("m2n2: warning: ")]


def test_no_benchmark_warning_for_own_tasks(folder: Path) -> None:
    from m2n2_plugin.search.fitness import benchmark_warning
    from m2n2_plugin.search.fitness import load_fitness

    fitness, docs, _ = load_fitness(parse_config(config(folder), base_dir=folder))
    assert benchmark_warning({t: fitness._loaded["tasks"][t] for t in docs.ids}) is None


def test_a_weight_on_a_group_is_the_weight_of_each_of_its_subtasks(
    folder: Path, two_folders: Path, tmp_path: Path
) -> None:
    """``task_weights`` may name a group from ``fitness.tasks``: its subtasks weigh that much
    (the weights module resolves groups through lm-eval's own group map)."""
    from m2n2_plugin.search.fitness import load_fitness
    from m2n2_plugin.search.weights import FitnessWeights

    (tmp_path / "solo.yaml").write_text("group: tiny_solo\ntask:\n  - tiny_gsm_b\n")
    cfg = config(
        folder,
        include_path=["tasks", str(two_folders), str(tmp_path)],
        tasks=["tiny_solo", "tiny_gsm"],
        fitness_docs=3,
        heldout_docs=2,
        confirm_run_unsafe_code=True,
        task_weights={"tiny_solo": 3.0},
    )
    parsed = parse_config(cfg, base_dir=folder)
    fitness, docs, _ = load_fitness(parsed)
    assert list(docs.ids) == ["tiny_gsm_b", "tiny_gsm"]
    weights = FitnessWeights.from_config("per_task", parsed.fitness.task_weights, docs, fitness)
    assert weights.task_weights == {"tiny_gsm_b": 3.0, "tiny_gsm": 1.0}
    assert weights.per_document["tiny_gsm_b"] == pytest.approx(
        3 * weights.per_document["tiny_gsm"]
    )
    assert weights.capacity is not None and weights.capacity.mean() == pytest.approx(1.0)
