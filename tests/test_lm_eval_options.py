"""lm-eval's own options pass through the fitness section, under lm-eval's names (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evolve_workspace import build_model
from evolve_workspace import write_gsm_task

from m2n2_plugin.config import parse_config
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.example import build_tokenizer

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
    from m2n2_plugin.evolve import evolve

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
    from m2n2_plugin.config import load_config

    with pytest.raises(M2N2Error, match="accepted: apply_chat_template"):
        load_config(path)
