"""The parts of Optuna, lm-eval and mergekit that are not their public API, used as we use them.

pyproject.toml bounds these libraries below their next major version; within that range a
minor release may still move an internal. Each test here names the internal it checks, so an
upgrade that moves one fails here, loudly and by name, instead of somewhere deep in a run (or,
worse, silently: ``fail_dead_trials`` would skip its check if the RDB layer were not found).
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest

from m2n2_plugin import example
from m2n2_plugin.example import write_jsonl

# --------------------------------------------------------------------------- Optuna


@pytest.fixture()
def rdb_study(tmp_path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=60, grace_period=120
    )
    return optuna.create_study(storage=storage, study_name="internals")


def test_optuna_storage_and_trial_ids(rdb_study: optuna.Study) -> None:
    """``study._storage``, ``study._study_id``, ``trial._trial_id`` and the storage calls the
    sampler and evolve make with them (trial system attrs, trial by number, state)."""
    trial = rdb_study.ask()
    storage, study_id = rdb_study._storage, rdb_study._study_id
    assert storage.get_trial_id_from_study_id_trial_number(study_id, 0) == trial._trial_id
    storage.set_trial_system_attr(trial._trial_id, "m2n2:test", [1, 2])
    frozen = storage.get_trial(trial._trial_id)
    assert frozen._trial_id == trial._trial_id
    assert frozen.system_attrs["m2n2:test"] == [1, 2]
    storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    assert rdb_study.trials[0].state == optuna.trial.TrialState.FAIL


def test_optuna_rdb_layer_and_heartbeat_table(rdb_study: optuna.Study) -> None:
    """``evolve.fail_dead_trials`` finds the RDBStorage under Optuna's cache layer
    (``_backend``), reads ``engine`` / ``heartbeat_interval`` / ``grace_period`` and queries
    ``optuna.storages._rdb.models.TrialHeartbeatModel.trial_id``."""
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy import select

    rdb = getattr(rdb_study._storage, "_backend", rdb_study._storage)
    assert isinstance(rdb, optuna.storages.RDBStorage), type(rdb)
    assert (rdb.heartbeat_interval, rdb.grace_period) == (60, 120)
    trial = rdb_study.ask()
    rdb.record_heartbeat(trial._trial_id)
    with rdb.engine.connect() as conn:
        ids = set(conn.execute(select(TrialHeartbeatModel.trial_id)).scalars())
    assert ids == {trial._trial_id}


def test_optuna_logs_a_failed_trial_on_the_optimize_logger() -> None:
    """``evolve._OneLineErrors`` filters the logger ``optuna.study._optimize``, which logs
    "Trial N failed with parameters ..." with the exception, then "Trial N failed with
    value None."."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("optuna.study._optimize")
    handler = Keep()
    logger.addHandler(handler)
    try:
        study = optuna.create_study()

        def fail(trial: optuna.Trial) -> float:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            study.optimize(fail, n_trials=1)
    finally:
        logger.removeHandler(handler)
    first, *rest = [r for r in records if r.getMessage().startswith("Trial 0 failed")]
    assert first.getMessage().split()[1] == "0"
    assert first.exc_info is not None and isinstance(first.exc_info[1], KeyError)
    assert any(r.getMessage().startswith("Trial 0 failed with value") for r in rest)


# --------------------------------------------------------------------------- lm-eval


def test_lm_eval_task_manager_load_and_metric_list(tmp_path: Path) -> None:
    """``TaskManager.load`` returns ``{"tasks", "groups", "group_map"}`` (what
    ``LmEvalFitness.score`` hands to ``evaluate``), and a task without ``metric_list`` keeps
    its default metrics in ``task._metric_fn_list``."""
    from lm_eval.tasks import TaskManager

    write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 3)
    task_yaml = example.TASK_YAML.format(
        task="internals_task", data=tmp_path / "d.jsonl", max_gen_toks=2, pattern="(.*)"
    )
    (tmp_path / "t.yaml").write_text(task_yaml.split("filter_list:")[0])  # default metrics
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(
        ["internals_task"]
    )
    assert {"tasks", "groups", "group_map"} <= set(loaded)
    task = loaded["tasks"]["internals_task"]
    assert "exact_match" in list(task._metric_fn_list)


def test_lm_eval_hflm_keeps_the_model_object_where_it_is() -> None:
    """``HFLM(pretrained=<model>)`` uses that very object (the resident model whose tensors
    every trial replaces) on the model's own device."""
    from lm_eval.models.huggingface import HFLM

    from m2n2_plugin.example import build_model
    from m2n2_plugin.example import build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok), hidden=16, layers=1)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
    assert lm.model is model
    assert str(lm.device) == str(model.device)


# --------------------------------------------------------------------------- mergekit


def test_mergekit_internals_the_merge_method_uses() -> None:
    """Module paths of mergekit 0.1.x that ``merge_method`` and ``resident`` import."""
    from mergekit.architecture import ConfiguredModelArchitecture  # noqa: F401
    from mergekit.architecture import arch_info_for_config  # noqa: F401
    from mergekit.architecture.auto import infer_architecture_info  # noqa: F401
    from mergekit.architecture.json_definitions import NAME_TO_ARCH
    from mergekit.io.tasks import LoaderCache
    from mergekit.io.tasks import LoadTensor  # noqa: F401
    from mergekit.merge_methods.base import FunctionalGroupMergeMethod  # noqa: F401
    from mergekit.options import MergeOptions  # noqa: F401

    assert "LlamaForCausalLM" in NAME_TO_ARCH
    assert callable(getattr(LoaderCache(), "get", None))


def test_mergekit_card_asks_the_hub_through_is_hf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mergekit 0.1.5's card step asks ``mergekit.card.is_hf``, which the plugin mends so that
    an existing folder is local (offline, the Hub would be asked about ``models/a`` and fail)."""
    import mergekit.card

    import m2n2_plugin

    m2n2_plugin._autoload.install()  # mends an already imported card module at once
    assert getattr(mergekit.card.is_hf, "m2n2_local_first", False)
    (tmp_path / "models" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert mergekit.card.is_hf("models/a") is False
    assert mergekit.card.is_hf("/abs/path") is False  # mergekit's own rule, kept
    assert mergekit.card.is_hf("org/not-here") is True  # not local: a Hub repo, as before
