"""Throughput of `m2n2 evolve` with 1, 2 and 4 workers on one machine, and storage round trips.

The built-in example (``m2n2 example``: two tiny specialists, 120 generation documents) is
evolved by W worker processes sharing one study and one output folder, for W in ``--workers``.
Each worker is ``m2n2 evolve`` itself (``cli.main``), started after its imports behind a barrier
so that all W run together; every run has the same budget (``--trials``, the study's total).

* trials per minute: finished trials (COMPLETE or PRUNED) over the span from the first trial's
  start to the last one's end;
* storage round trips per trial: SQL statements sent by each worker during ``optimize``
  (SQLAlchemy ``before_cursor_execute`` events), summed over the workers, per finished trial,
  split by who sent them: ``sampler`` (M2N2Sampler: planning a trial, storing its scores,
  folding the archive for the objective and ``sync_files``), ``wait`` (``Run.fold_up_to``: a
  child waiting for the lower-numbered trials before it is admitted or rejected, polling the
  fold and failing stale trials), ``other`` (Optuna's own trial bookkeeping, the user attrs
  ``m2n2 evolve`` writes, ``sync_files``' reads of running trials) and ``heartbeat`` (Optuna's
  heartbeat thread);
* wait: the mean seconds a child that was scored in full spent in ``Run.admit``
  (``m2n2.timing`` user attr).

    python benchmarks/bench_workers.py                            # SQLite in the output folder
    python benchmarks/bench_workers.py --storage postgresql+psycopg2://m2n2@127.0.0.1:5432/db
    python benchmarks/bench_workers.py --trials 60 --workers 1 2 4 --folder /tmp/bench-workers

With a PostgreSQL URL each run gets a fresh database next to the URL's (CREATE DATABASE).
The load average before each run is printed: on a shared machine it moves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- one worker


def _worker(report: Path, barrier: Path, n_workers: int, argv: list[str]) -> int:
    """Run `m2n2 evolve` with an SQL statement counter; write the counts to ``report``."""
    import lm_eval.evaluator  # noqa: F401  (the slow imports, before the barrier)
    import lm_eval.models.huggingface  # noqa: F401
    import m2n2_plugin.hub.m2n2 as sampler_module
    import matplotlib.pyplot  # noqa: F401
    import mergekit.config  # noqa: F401
    import optuna
    import sqlalchemy
    import sqlalchemy.event

    import m2n2_plugin.search.trial as trial_module
    from m2n2_plugin.cli import main

    sampler_file = sampler_module.__file__
    evolve_file = trial_module.__file__
    counts = {"sampler": 0, "wait": 0, "other": 0, "heartbeat": 0}
    state = {"on": False, "trials": 0}

    def on_execute(*_: Any) -> None:
        if not state["on"]:
            return
        if threading.current_thread() is not threading.main_thread():
            counts["heartbeat"] += 1
            return
        frame = sys._getframe(1)
        kind = "other"
        while frame is not None:
            code = frame.f_code
            if code.co_filename == evolve_file and code.co_name == "fold_up_to":
                kind = "wait"
                break
            if code.co_filename == sampler_file:
                kind = "sampler"  # keep looking: the sampler's fold while waiting is a wait
            frame = frame.f_back
        counts[kind] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    optimize = optuna.Study.optimize

    def counted_optimize(self: optuna.Study, *a: Any, **kw: Any) -> None:
        state["on"] = True
        try:
            optimize(self, *a, **kw)
        finally:
            state["on"] = False

    optuna.Study.optimize = counted_optimize  # type: ignore[method-assign]
    objective = trial_module.Run.objective

    def counted_objective(self: Any, trial: Any) -> float:
        state["trials"] += 1
        return objective(self, trial)

    trial_module.Run.objective = counted_objective  # type: ignore[method-assign]

    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < n_workers:
        time.sleep(0.02)
    code = main(argv)
    report.write_text(json.dumps({"counts": counts, "trials_run": state["trials"]}))
    return code


def plain_round_trips(url: str, n_trials: int = 200) -> dict[str, float]:
    """SQL statements per trial of a plain Optuna study with M2N2Sampler (one process).

    The objective is the hub tests' toy (random 0/1 scores over 12 examples, set_scores, no
    files); ``sampler`` counts what M2N2Sampler sends, ``other`` Optuna's own bookkeeping.
    """
    import m2n2_plugin.hub.m2n2 as sampler_module
    import optuna
    import sqlalchemy
    import sqlalchemy.event
    from m2n2_plugin.hub import M2N2Sampler

    sys.path.insert(0, str(HERE.parents[1] / "hub_package" / "samplers" / "m2n2" / "tests"))
    from m2n2_toy import toy_objective

    counts = {"sampler": 0, "other": 0}
    state = {"on": False}

    def on_execute(*_: Any) -> None:
        if not state["on"]:
            return
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == sampler_module.__file__:
                counts["sampler"] += 1
                return
            frame = frame.f_back
        counts["other"] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = M2N2Sampler(archive_size=20, n_seeds=2, seed=0)
    study = optuna.create_study(storage=url, sampler=sampler, study_name="plain")
    study.optimize(toy_objective(sampler), n_trials=20)  # the seeds and the first children
    state["on"] = True
    study.optimize(toy_objective(sampler), n_trials=n_trials)
    state["on"] = False
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    return {k: v / n_trials for k, v in counts.items()}


# --------------------------------------------------------------------------- the benchmark


def _fresh_storage(base: str | None, tag: str) -> str | None:
    if base is None:
        return None
    import sqlalchemy

    name = f"m2n2_bench_{tag}_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return sqlalchemy.engine.make_url(base).set(database=name).render_as_string(False)


def run_once(config: Path, folder: Path, n_workers: int, n_trials: int, url: str | None) -> dict:
    import optuna
    import yaml

    tag = f"w{n_workers}"
    out = folder / f"out-{tag}-{uuid.uuid4().hex[:6]}"
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(out)
    cfg["search"]["n_trials"] = n_trials
    if url is not None:
        cfg["search"]["storage"] = url
    run_config = folder / f"evolve-{tag}.yml"
    run_config.write_text(yaml.safe_dump(cfg))
    barrier = folder / f"barrier-{out.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    procs = []
    for i in range(n_workers):
        report = folder / f"report-{out.name}-{i}.json"
        cmd = [sys.executable, str(HERE), "--worker", str(report), str(barrier), str(n_workers)]
        cmd += ["--", "evolve", str(run_config), "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, cwd=folder, stdout=subprocess.DEVNULL)
        procs.append((proc, report))
    for proc, _ in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker failed ({proc.returncode})")
    storage = url or f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="m2n2", storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in study.trials if t.state in states]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    minutes = (end - start).total_seconds() / 60
    counts = {"sampler": 0, "wait": 0, "other": 0, "heartbeat": 0}
    for _, report in procs:
        for key, value in json.loads(report.read_text())["counts"].items():
            counts[key] += value
    waits = [
        t.user_attrs["m2n2.timing"]["wait"]
        for t in done
        if "m2n2.parents" in t.user_attrs and "wait" in t.user_attrs.get("m2n2.timing", {})
    ]
    return {
        "workers": n_workers,
        "finished": len(done),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in done),
        "minutes": minutes,
        "trials_per_minute": len(done) / minutes,
        "round_trips_per_trial": {k: v / len(done) for k, v in counts.items()},
        "mean_wait_s": sum(waits) / len(waits) if waits else 0.0,
        "load_before": load,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        split = sys.argv.index("--")
        report, barrier, n = sys.argv[2:split]
        code = _worker(Path(report), Path(barrier), int(n), sys.argv[split + 1 :])
        sys.stdout.flush()
        os._exit(code)  # skip the interpreter's teardown (seconds of CPU, nothing measured)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--storage", default=None, help="a PostgreSQL URL (default: SQLite)")
    parser.add_argument("--folder", default="/tmp/m2n2-bench-workers")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from m2n2_plugin.example import build_example

    folder = Path(args.folder)
    config = build_example(folder, n_trials=args.trials, quiet=True)
    results = []
    for _ in range(args.repeats):
        for n in args.workers:
            url = _fresh_storage(args.storage, f"w{n}")
            r = run_once(config, folder, n, args.trials, url)
            results.append(r)
            rt = r["round_trips_per_trial"]
            print(
                f"{n} worker(s): {r['trials_per_minute']:6.1f} trials/min "
                f"({r['finished']} trials, {r['pruned']} pruned, {r['minutes']:.2f} min; "
                f"load before {r['load_before']:.1f}); round trips/trial: sampler "
                f"{rt['sampler']:.1f}, wait {rt['wait']:.1f}, other {rt['other']:.1f}, "
                f"heartbeat {rt['heartbeat']:.1f}; mean admit wait {r['mean_wait_s']:.3f} s",
                flush=True,
            )
    url = _fresh_storage(args.storage, "plain") or f"sqlite:///{folder / uuid.uuid4().hex}.db"
    plain = plain_round_trips(url)
    print(
        f"plain Optuna study, 1 process: round trips/trial: sampler {plain['sampler']:.1f}, "
        f"other {plain['other']:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "plain": plain}, indent=2))


if __name__ == "__main__":
    main()
