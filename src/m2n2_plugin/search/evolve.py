"""``m2n2 evolve``: the loop. Seeds from a mergekit config, fitness from lm-eval, search by
M2N2Sampler.

``evolve`` opens the run (:mod:`~m2n2_plugin.search.start`), runs the trials
(:mod:`~m2n2_plugin.search.trial`: one child each) until the study has ``n_trials`` finished
ones, and hands the final archive to :mod:`m2n2_plugin.report` to write the outputs.

The Optuna study (SQLite in the output folder by default) is the state: rerunning the same
command resumes it. Archive members that are children live in ``<out>/archive/`` as
safetensors (written atomically, deleted when evicted); seeds stay where they are. What a run
holds between trials (the study, the members' files, the outputs) is
:mod:`m2n2_plugin.search.run_state`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import optuna

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.report import tracking
from m2n2_plugin.search.config import EvolveConfig
from m2n2_plugin.search.config import load_config
from m2n2_plugin.search.config import with_device
from m2n2_plugin.search.run_state import DONE_STATES
from m2n2_plugin.search.run_state import count_done
from m2n2_plugin.search.run_state import write_error
from m2n2_plugin.search.start import prepare_or_clean
from m2n2_plugin.search.trial import Run
from m2n2_plugin.search.workers import MemberEvicted
from m2n2_plugin.search.workers import fail_dead_trials
from m2n2_plugin.search.workers import write_outputs_locked


class _OneLineErrors(logging.Filter):
    """Drop Optuna's "Trial N failed" traceback when the CLI says it in one line.

    A trial that fails on bad input (invalid scores, a broken task) stops the run with
    ``m2n2: error: ...``, and Ctrl-C in the middle of a trial with ``m2n2: interrupted; ...``;
    Optuna would first log the error (or ``KeyboardInterrupt()``) with a full traceback, then
    "Trial N failed with value None." (both records are dropped). The trial is FAIL in the
    study, so a rerun runs it again; nothing already written is touched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._next: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        said = isinstance(exc, M2N2Error) and not isinstance(exc, MemberEvicted)
        if said or isinstance(exc, KeyboardInterrupt):
            number = record.getMessage().split()[1]
            self._next = f"Trial {number} failed with value"
            return False
        if self._next is not None and record.getMessage().startswith(self._next):
            self._next = None
            return False
        return True


def evolve(
    config: EvolveConfig | str | Path,
    output_dir: str | Path | None = None,
    n_trials: int | None = None,
    progress: bool = True,
    on_trial: Callable[[Run, optuna.trial.FrozenTrial], None] | None = None,
    device: str | None = None,
) -> Run:
    """Run (or resume) an M2N2 evolution; returns the :class:`Run` after writing the outputs.

    ``n_trials`` overrides ``search.n_trials``: the study's total number of finished trials,
    so rerunning after an interruption runs only what is missing (and says so: "resuming: 12
    of 30 trials done"). One line per finished trial is printed (``trials.log``'s line);
    ``progress`` adds the progress bar. ``device`` overrides
    ``fitness.device`` (``m2n2 evolve --device``): workers of one study on one machine can
    each take their own GPU; the device is not part of the study's fingerprint.
    """
    from tqdm.auto import tqdm

    if n_trials is not None and n_trials < 1:  # before anything is read or written
        raise M2N2Error(f"the number of trials must be at least 1, got {n_trials}")
    cfg = config if isinstance(config, EvolveConfig) else load_config(config)
    if device is not None:
        cfg = with_device(cfg, device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _OneLineErrors) for f in optimize_log.filters):
        optimize_log.addFilter(_OneLineErrors())
    # A missing MLflow / W&B package: one line, before anything is written.
    tracking.require(cfg.search.tracking)
    run = prepare_or_clean(cfg, output_dir)
    # What a killed worker left: its trial is failed once the heartbeat is stale, then the
    # child file it saved and any temp file are deleted; live workers' files are kept.
    fail_dead_trials(run.study)
    run.sync_files()
    run.check_member_files()
    tracker = tracking.start(
        cfg.search.tracking,
        cfg.tracking_uri(),
        run.study,
        run.out,
        lambda: run.sampler.archive(run.study),
    )
    total = cfg.search.n_trials if n_trials is None else n_trials
    done = count_done(run.study)
    if done:
        tqdm.write(f"resuming: {min(done, total)} of {total} trials done")
    bar = tqdm(
        total=total,
        initial=min(done, total),
        desc="m2n2",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def after(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        arch = run.sync_files()
        line, record = run.log_trial(frozen, arch)
        bar.update(1)
        bar.set_postfix(best=f"{record['archive_best']:.3f}", coverage=f"{record['coverage']:.3f}")
        tqdm.write(line)  # above the bar, or alone with progress=False
        if on_trial is not None:
            on_trial(run, frozen)

    remaining = max(0, total - done)
    # ``total`` is the study's budget, shared by every worker: each stops once the study has
    # that many finished trials (trials already running elsewhere still finish).
    budget = optuna.study.MaxTrialsCallback(total, states=DONE_STATES)
    try:
        if remaining:
            run.study.optimize(
                run.objective,
                n_trials=remaining,
                callbacks=[after, *tracker.callbacks, budget],
                catch=(MemberEvicted,),
            )
    finally:
        bar.close()
    run.sync_files()
    try:
        write_outputs_locked(run.out, run.write_outputs)
    except OSError as exc:  # best/ is written beside the old one, then swapped in
        raise write_error(Path(exc.filename or run.out), exc) from exc
    tracker.finish()  # M2N2's best into the study, dashboard plots, tracking summary
    return run
