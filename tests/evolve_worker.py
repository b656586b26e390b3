"""One worker process for the multi-worker and crash tests.

    python evolve_worker.py [--barrier DIR N] [--pause-at PHASE --from-trial K --signal FILE]
                            -- evolve CONFIG [m2n2 options]
    python evolve_worker.py plain URL STUDY N_TRIALS ARCHIVE_SIZE

The first form runs ``m2n2 evolve`` exactly as the console script does (``cli.main``), after
two optional test aids:

* ``--barrier DIR N``: import everything first, then wait until N workers are ready, so the
  workers' trials really overlap (imports take seconds and would otherwise stagger them);
* ``--pause-at merge|evaluate|save``: in the first trial numbered ``K`` or more that reaches
  that phase, write ``FILE`` (JSON: phase, trial, pid) and sleep, so that the test can
  ``kill -9`` the process right there. ``merge``: the child is merged, not yet evaluated;
  ``evaluate``: lm-eval has scored a chunk of documents; ``save``: half of the child's
  safetensors temp file is on disk; ``saved``: the child's file is complete, the trial not;
  ``uploading``: the child's upload to the archive store (``search.archive_store``) has
  begun (the object holds its first KiB), the trial not; ``uploaded``: the child is in the
  archive store, the trial not.

The second form is a plain Optuna study with M2N2Sampler and the hub tests' toy objective.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {"trial": -1, "paused": False}


def _pause_here(args: argparse.Namespace, phase: str) -> None:
    if _STATE["paused"] or args.pause_at != phase or _STATE["trial"] < args.from_trial:
        return
    _STATE["paused"] = True
    # A live worker has a heartbeat on record; Optuna's heartbeat thread writes its first one
    # a moment after the trial starts, which under load can be later than this pause. Write it
    # now, so the kill always leaves a trial whose heartbeat goes stale.
    trial = _STATE["optuna_trial"]
    trial.study._storage.record_heartbeat(trial._trial_id)
    info = {"phase": phase, "trial": _STATE["trial"], "pid": os.getpid()}
    tmp = Path(args.signal).with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, args.signal)
    time.sleep(3600)  # the test kills us here


def _install_pause(args: argparse.Namespace) -> None:
    import m2n2_plugin.merge.models as models
    import m2n2_plugin.merge.resident as resident
    from m2n2_plugin.search.fitness import LmEvalFitness
    from m2n2_plugin.search.trial import Run

    objective = Run.objective

    def tracked(self: Run, trial: Any) -> float:
        _STATE["trial"] = trial.number
        _STATE["optuna_trial"] = trial
        return objective(self, trial)

    Run.objective = tracked  # type: ignore[method-assign]

    # Run.objective imports these from m2n2_plugin.merge.resident when it runs: patch them there.
    merge = resident.merge_into_model

    def merging(*a: Any, **kw: Any) -> Any:
        out = merge(*a, **kw)
        _pause_here(args, "merge")
        return out

    resident.merge_into_model = merging  # type: ignore[assignment]

    score = LmEvalFitness.score

    def scoring(self: LmEvalFitness, *a: Any, **kw: Any) -> Any:
        out = score(self, *a, **kw)
        _pause_here(args, "evaluate")
        return out

    LmEvalFitness.score = scoring  # type: ignore[method-assign]

    save_file = models.save_file

    def saving(tensors: dict, filename: str, *a: Any, **kw: Any) -> None:
        if args.pause_at == "save" and not _STATE["paused"] and _STATE["trial"] >= args.from_trial:
            save_file(tensors, filename, *a, **kw)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])  # a write cut short
            _pause_here(args, "save")
        save_file(tensors, filename, *a, **kw)

    models.save_file = saving  # type: ignore[assignment]

    save_child = resident.save_child

    def saved(*a: Any, **kw: Any) -> None:
        save_child(*a, **kw)
        _pause_here(args, "saved")

    resident.save_child = saved  # type: ignore[assignment]

    from m2n2_plugin.search.archive_store import ArchiveStore
    from m2n2_plugin.search.member_store import MemberStore

    write = MemberStore.write

    def uploading(self: MemberStore, artifact_id: str, body: Any) -> None:
        if args.pause_at == "uploading" and not _STATE["paused"]:
            if _STATE["trial"] >= args.from_trial:
                write(self, artifact_id, io.BytesIO(body.read(1 << 10)))  # an object begun
                _pause_here(args, "uploading")
        write(self, artifact_id, body)

    MemberStore.write = uploading  # type: ignore[method-assign]

    kept = ArchiveStore.kept  # after the upload, in the background or not

    def uploaded(self: ArchiveStore, *a: Any, **kw: Any) -> None:
        kept(self, *a, **kw)
        _pause_here(args, "uploaded")

    ArchiveStore.kept = uploaded  # type: ignore[method-assign]


def _barrier(folder: str, n: int) -> None:
    ready = Path(folder)
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 300
    while len(list(ready.glob("ready-*"))) < n:
        if time.monotonic() > deadline:
            sys.exit("barrier: the other workers never became ready")
        time.sleep(0.02)


def _plain(url: str, study_name: str, n_trials: int, archive_size: int) -> None:
    """A plain Optuna study with the sampler: the hub tests' toy objective, fails and prunes."""
    import optuna

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "hub_package" / "samplers" / "m2n2" / "tests"))
    from m2n2_plugin.hub import M2N2Sampler
    from m2n2_toy import ToyFailure
    from m2n2_toy import toy_objective

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = M2N2Sampler(archive_size=archive_size, seed=0)
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=5, grace_period=10)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    objective = toy_objective(sampler, fail_every=7, prune_every=11, sleep=0.005)
    study.optimize(objective, n_trials=n_trials, catch=(ToyFailure,))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "plain":
        url, study_name, n_trials, archive_size = argv[1:]
        _plain(url, study_name, int(n_trials), int(archive_size))
        return 0
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--barrier", nargs=2, metavar=("DIR", "N"))
    parser.add_argument(
        "--pause-at", choices=("merge", "evaluate", "save", "saved", "uploading", "uploaded")
    )
    parser.add_argument("--from-trial", type=int, default=0)
    parser.add_argument("--signal")
    args = parser.parse_args(argv[:split])

    # Everything `m2n2 evolve` imports lazily, so the barrier waits past the slow part.
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import mergekit.config  # noqa: F401
    import transformers  # noqa: F401

    import m2n2_plugin.merge.resident  # noqa: F401
    import m2n2_plugin.search.evolve  # noqa: F401
    from m2n2_plugin.cli import main as m2n2_main

    if args.pause_at:
        _install_pause(args)
    # SIGUSR1 writes every thread's stack to stderr: a test whose worker hangs says where.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Ctrl-C as a terminal delivers it: a shell without job control starts background jobs
    # with SIGINT ignored, and a child inherits that, so a test run from such a job would
    # send its SIGINT to a worker that never sees it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.barrier:
        _barrier(args.barrier[0], int(args.barrier[1]))
    return m2n2_main(argv[split + 1 :])


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown of torch, transformers and lm-eval: seconds of CPU per
    # process that the tests would wait for and that tell nothing.
    os._exit(code)
