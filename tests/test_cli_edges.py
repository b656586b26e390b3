"""What a new user meets at the terminal: bad counts, too many documents, Ctrl-C, resuming.

Each bad input is one line on stderr, exit 2, and nothing written; Ctrl-C in the middle of a
trial is one line, exit 130, and a rerun of the same command resumes and says where.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from evolve_workspace import build_workspace
from evolve_workspace import check_study_and_files
from evolve_workspace import worker_cmd
from evolve_workspace import worker_env
from evolve_workspace import write_config

from m2n2_plugin.cli import main

INTERRUPTED = "m2n2: interrupted; rerun the same command to resume"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("edges"))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("m2n2: error: "), err
    return err[0]


@pytest.mark.parametrize("n", ["-5", "0"])
def test_a_trial_count_below_one_is_refused(
    n: str, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(workspace, f"count{n}")
    assert main(["evolve", str(cfg), "--no-progress", "-n", n]) == 2
    assert one_error_line(capsys) == (
        f"m2n2: error: the number of trials must be at least 1, got {n}"
    )
    assert not (workspace / f"out-count{n}").exists()
    assert main(["example", str(workspace / f"example{n}"), "-n", n]) == 2
    one_error_line(capsys)
    assert not (workspace / f"example{n}").exists()


@pytest.mark.parametrize(
    ("name", "fitness_docs", "heldout_docs", "message"),
    [
        (
            "manyfit",
            100000,
            5,
            "fitness_docs: 100000 documents asked of task 'tiny_mc', which has 40",
        ),
        (
            "manyheld",
            30,
            20,
            "heldout_docs: 20 documents asked of task 'tiny_mc' after its 30 fitness "
            "documents, which has 40",
        ),
    ],
)
def test_more_documents_than_a_task_has_is_refused(
    name: str,
    fitness_docs: int,
    heldout_docs: int,
    message: str,
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = write_config(
        workspace, name, fitness__fitness_docs=fitness_docs, fitness__heldout_docs=heldout_docs
    )
    assert main(["evolve", str(cfg), "--no-progress"]) == 2
    assert one_error_line(capsys) == f"m2n2: error: {message}"
    assert not (workspace / f"out-{name}").exists()


def test_example_help_shows_the_default_seed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["example", "--help"])
    assert "(default: 3)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_ctrl_c_mid_trial_is_one_line_and_the_rerun_resumes(workspace: Path) -> None:
    """SIGINT while trial 3 is being scored (a real process, as a terminal's Ctrl-C sends it):
    one line, exit 130, the finished trials kept; the same command then resumes, says where,
    and prints one line per trial although the progress bar is off."""
    cfg = write_config(workspace, "ctrlc", search__n_trials=6)
    out = workspace / "out-ctrlc"
    signal_file = workspace / "ctrlc.signal"
    proc = subprocess.Popen(
        worker_cmd(
            "--pause-at",
            "evaluate",
            "--from-trial",
            "3",
            "--signal",
            str(signal_file),
            "--",
            "evolve",
            str(cfg),
            "--no-progress",
        ),  # fmt: skip
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not signal_file.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached trial 3"
        time.sleep(0.1)
    assert json.loads(signal_file.read_text())["trial"] == 3
    written = sorted(p.name for p in (out / "archive").glob("*"))
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it hangs: its threads' stacks, then kill
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"no exit 120 s after SIGINT (process alive: {alive}); stderr:\n{stderr}")
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [INTERRUPTED]
    assert [line.split(":")[0] for line in stdout.splitlines()] == [f"trial {n}" for n in range(3)]
    assert sorted(p.name for p in (out / "archive").glob("*")) == written

    rerun = subprocess.run(
        ["m2n2", "evolve", str(cfg), "--no-progress"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    lines = rerun.stdout.splitlines()
    assert lines[0] == "resuming: 3 of 6 trials done"
    # The interrupted trial 3 failed; trials 4, 5 and 6 make up the budget.
    assert [line.split(":")[0] for line in lines[1:4]] == ["trial 4", "trial 5", "trial 6"]
    assert rerun.stderr.strip() == "", rerun.stderr
    study = optuna.load_study(study_name="m2n2", storage=f"sqlite:///{out / 'study.db'}")
    check_study_and_files(out, study, archive_size=4)
