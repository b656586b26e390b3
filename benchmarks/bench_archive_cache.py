"""How often one worker fetches a parent with ``search.archive_store``: a run replayed through
the cache.

A finished run's ``trials.log`` (which parents each child drew) and ``history.jsonl`` (the
archive after each trial) are replayed, in trial order, through the real
:class:`~m2n2_plugin.search.archive_store.ArchiveStore` over a folder store, each member a
few bytes instead of its weights: parents are read with ``local_member`` (a miss is a fetch),
admitted children are uploaded with ``upload``, and after each trial the copies of trials that
left the archive are deleted, as ``sync_files`` does with one worker. Two eviction rules when
an upload overfills the cache:

* ``lru``: the least recently used copy (``upload`` without ``displaced``);
* ``displaced first``: the copy of the member the child displaces, then the least recently
  used (what ``m2n2 evolve`` does).

One worker: with several, a parent made by another worker is a miss under both rules.
The figures are counts, not seconds: a fetch costs one member's transfer
(benchmarks/bench_archive_store.py measures it).

    python benchmarks/bench_archive_cache.py RUN_FOLDER [--cache 2 4 A] [--json OUT]

Recorded (benchmarks/results/bench_archive_cache/): ``example_200.json``, the built-in
example for 200 trials (``m2n2 example -n 200``: archive 8, two seeds, search seed 0);
``skills_104.json``, the first 104 trials of a SmolLM2 skills run (archive 10, three seeds:
examples/skills, addition x digit reversal, M2N2 refining task arithmetic).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path
from typing import Any

CHILD = re.compile(r"trial (\d+): child of (\d+) x (\d+) ")
SEED = re.compile(r"trial (\d+): seed ")


def read_run(run: Path) -> tuple[dict[int, tuple[int, int]], set[int], list[list[int]]]:
    """Parents per child, the seeds' trials, and the archive's members after each trial."""
    parents: dict[int, tuple[int, int]] = {}
    seeds: set[int] = set()
    for line in (run / "trials.log").read_text().splitlines():
        if m := CHILD.match(line):
            parents[int(m[1])] = (int(m[2]), int(m[3]))
        elif m := SEED.match(line):
            seeds.add(int(m[1]))
    members: list[list[int]] = []
    for line in (run / "history.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["trial"] == len(members), "history.jsonl is not in trial order"
        members.append(record["members"])
    return parents, seeds, members


def replay(run: Path, cache: int, displaced_first: bool) -> dict[str, Any]:
    import optuna

    from m2n2_plugin.search.archive_store import TRIAL_ATTR
    from m2n2_plugin.search.archive_store import ArchiveStore
    from m2n2_plugin.search.workers import member_file

    parents, seeds, members = read_run(run)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = ArchiveStore.open("objects", root, root / "out", cache)
        study = optuna.create_study()
        meta: dict[int, dict[str, Any]] = {}
        reads = misses = uploads = 0
        before: list[int] = []
        for number, after in enumerate(members):
            trial = study.ask()
            store.begin_trial()
            for p in parents.get(number, ()):
                if p not in seeds:
                    store.local_member(p, {TRIAL_ATTR: meta[p]}, evicted=lambda: False)
            reads += store.traffic.hits + store.traffic.misses
            misses += store.traffic.misses
            if number in after and number in parents:
                path = member_file(store.out, number)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(str(number).encode())
                gone = [m for m in before if m not in after]
                store.upload(trial, path, gone[0] if gone and displaced_first else None)
                meta[number] = study.trials[number].user_attrs[TRIAL_ATTR]
                uploads += 1
            for m in set(before) - set(after):  # sync_files, one worker
                member_file(store.out, m).unlink(missing_ok=True)
            study.tell(trial, 0.0)
            before = after
    return {
        "cache": cache,
        "rule": "displaced first" if displaced_first else "lru",
        "children": len(parents),
        "uploads": uploads,
        "parent_reads": reads,
        "fetches": misses,
        "hit_rate": 1 - misses / reads if reads else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run's output folder (trials.log, history.jsonl)")
    p.add_argument("--archive-size", type=int, help="default: the most members seen")
    p.add_argument("--cache", nargs="+", default=["2", "4", "A"], help="sizes; A: archive size")
    p.add_argument("--json", type=Path)
    p.add_argument("--source", help="what the run is, for the JSON (default: its folder)")
    args = p.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    size = args.archive_size or max(len(m) for m in read_run(args.run)[2])
    rows = []
    print(f"{'cache':>5} {'rule':>16} {'children':>8} {'uploads':>7} {'reads':>6} {'fetches':>7}")
    for label in args.cache:
        cache = size if label == "A" else int(label)
        for displaced_first in (False, True):
            r = replay(args.run, cache, displaced_first)
            rows.append(r)
            print(
                f"{cache:>5} {r['rule']:>16} {r['children']:>8} {r['uploads']:>7} "
                f"{r['parent_reads']:>6} {r['fetches']:>7}"
            )
    if args.json:
        record = {"run": args.source or str(args.run), "results": rows}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
