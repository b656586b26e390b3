"""``search.archive_store``: archive members in an Optuna artifact store, workers without a
shared folder.

Real clients over the real protocol: boto3 talks HTTP to moto's S3 server (``moto[server]``,
started here on 127.0.0.1, any free port); the folder store is Optuna's
FileSystemArtifactStore. Workers are ``m2n2 evolve`` processes (tests/evolve_worker.py) with an
output folder each and one SQLite study; one is killed with SIGKILL right after it uploaded a
child (the trial still RUNNING), and a third run starts from an empty folder and resumes from
the study and the store alone. Afterwards the archive is the re-fold of the trials, every child
member has exactly one object (its sha256 the recorded one) and no other object is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from evolve_workspace import build_workspace
from evolve_workspace import refold
from evolve_workspace import worker_cmd
from evolve_workspace import worker_env
from evolve_workspace import write_config
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from m2n2_plugin.cli import main as m2n2_main
from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.search.archive_store import TRAFFIC_ATTR
from m2n2_plugin.search.archive_store import TRIAL_ATTR
from m2n2_plugin.search.member_store import trial_objects

ARCHIVE_SIZE = 3  # as many slots as seeds: every child competes
CACHE_SIZE = 2  # below archive_size: members are fetched, cached and evicted
HEARTBEAT = 1
BUCKET = "m2n2-test"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 server on a free local port; boto3 finds it through AWS_ENDPOINT_URL, as it
    finds MinIO or any S3-compatible store. Yields a client on it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _store_url(kind: str, workspace: Path, name: str) -> str:
    return f"s3://{BUCKET}/{name}" if kind == "s3" else str(workspace / f"store-{name}")


def _objects(kind: str, url: str, s3_client: Any) -> dict[str, bytes]:
    """Every object in the store, by artifact id."""
    if kind == "s3":
        prefix = url.split("/", 3)[3] + "/"
        listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return {
            o["Key"][len(prefix) :]: s3_client.get_object(Bucket=BUCKET, Key=o["Key"])[
                "Body"
            ].read()
            for o in listed
        }
    folder = Path(url)
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


def _put(kind: str, url: str, s3_client: Any, artifact_id: str, data: bytes | None) -> None:
    """Overwrite (or with None, delete) one object behind m2n2's back."""
    if kind == "s3":
        key = url.split("/", 3)[3] + "/" + artifact_id
        if data is None:
            s3_client.delete_object(Bucket=BUCKET, Key=key)
        else:
            s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
    elif data is None:
        (Path(url) / artifact_id).unlink()
    else:
        (Path(url) / artifact_id).write_bytes(data)


def _config(workspace: Path, name: str, url: str | None, storage: str | None, **search: Any):
    settings = {
        "n_trials": 12,
        "archive_size": ARCHIVE_SIZE,
        "seed": 0,
        "heartbeat_interval": HEARTBEAT,
        **({"archive_store": url} if url else {}),
        **({"storage": storage} if storage else {}),
        **search,
    }
    return write_config(workspace, name, fitness__heldout_docs=None, search=settings)


def check_store(study: optuna.Study, objects: dict[str, bytes]) -> Any:
    """The store's invariants once no worker runs: the archive is the re-fold; each child
    member has exactly one object, whose sha256 is the one its trial recorded; there is no
    other object. Returns the archive."""
    from m2n2_plugin.hub import M2N2Sampler

    trials = study.get_trials(deepcopy=False)
    assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
    arch = M2N2Sampler(archive_size=ARCHIVE_SIZE).archive(study)
    slots, n_folded = refold(trials, ARCHIVE_SIZE)
    assert arch.slots == slots
    assert arch.n_folded == n_folded == sum(t.state == TrialState.COMPLETE for t in trials)
    assert len(set(arch.members)) == len(arch.members) <= ARCHIVE_SIZE
    children = [m for m in arch.members if "m2n2.seed" not in trials[m].user_attrs]
    expected = {}
    for number in children:
        meta = trials[number].user_attrs[TRIAL_ATTR]
        listed = get_all_artifact_meta(trials[number], storage=study._storage)
        assert [m.artifact_id for m in listed] == [meta["id"]]  # one artifact per member
        assert meta["id"] in objects, f"member {number} lost its object"
        assert hashlib.sha256(objects[meta["id"]]).hexdigest() == meta["sha256"]
        expected[meta["id"]] = number
    assert sorted(objects) == sorted(expected), "an orphan object is left in the store"
    return arch


def _dashboard_get(storage: str, url: str, study: optuna.Study, trial: Any) -> bytes:
    """GET a trial's artifact from optuna-dashboard's WSGI app opened on the study and store."""
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    from m2n2_plugin.search.member_store import artifact_store

    app = wsgi(storage, artifact_store=artifact_store(url))
    artifact_id = trial.user_attrs[TRIAL_ATTR]["id"]
    environ: dict[str, Any] = {
        "PATH_INFO": f"/artifacts/{study._study_id}/{trial._trial_id}/{artifact_id}"
    }
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
    assert status == ["200 OK"], (status, body[:200])
    return body


@pytest.mark.slow  # subprocesses: see pyproject's markers
@pytest.mark.parametrize(
    ("kind", "while_scoring", "phase"),
    [
        ("s3", False, "uploaded"),
        ("folder", False, "uploaded"),
        ("s3", True, "uploading"),
        ("folder", True, "uploading"),
    ],
)
def test_workers_on_two_machines_killed_and_resumed_from_the_store(
    kind: str, while_scoring: bool, phase: str, workspace: Path, request: pytest.FixtureRequest
) -> None:
    """Two workers, two output folders, one study; one killed with SIGKILL right after it
    uploaded a child (or mid-upload); a third run from an empty folder resumes from the study
    and the store. With ``upload_while_scoring`` children not kept were uploaded too: none
    may be left."""
    s3_client = request.getfixturevalue("s3") if kind == "s3" else None
    name = f"two-{kind}" + ("-early" if while_scoring else "")
    url = _store_url(kind, workspace, name)
    storage = f"sqlite:///{workspace / f'{name}.db'}"
    cfg = _config(
        workspace, name, url, storage, cache_size=CACHE_SIZE, upload_while_scoring=while_scoring
    )
    sig = workspace / f"{name}.signal"
    barrier = workspace / f"barrier-{name}"
    outs = [workspace / f"out-{name}-{i}" for i in range(3)]
    pause = ("--pause-at", phase, "--from-trial", "3", "--signal", str(sig))
    procs = [
        subprocess.Popen(
            worker_cmd(
                *("--barrier", str(barrier), "2"),
                *(pause if i == 1 else ()),
                *("--", "evolve", str(cfg), "-o", str(outs[i]), "--no-progress"),
            ),
            env=worker_env(),
            cwd=workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 300
    while not sig.exists():
        if procs[1].poll() is not None:
            pytest.fail("the worker to kill exited first:\n" + procs[1].communicate()[0][-3000:])
        assert time.monotonic() < deadline, "the worker never uploaded a child"
        time.sleep(0.05)
    info = json.loads(sig.read_text())
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].wait(timeout=30)
    # What the kill left: the trial's object (whole, or begun), and the trial knows its id.
    killed = optuna.load_study(study_name="m2n2", storage=storage).trials[info["trial"]]
    begun = trial_objects(killed, optuna.storages.get_storage(storage))
    assert len(begun) == 1 and begun[0] in _objects(kind, url, s3_client)
    output = procs[0].communicate(timeout=300)[0]
    assert procs[0].returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="m2n2", storage=storage)
    dead = study.trials[info["trial"]]
    # The killed trial uploaded its child: the object was there; the trial never completed.
    assert dead.state in (TrialState.RUNNING, TrialState.FAIL)
    dead_ids = trial_objects(dead, study._storage)
    assert dead_ids == begun

    # A third worker on a machine of its own: empty folder, the same config.
    time.sleep(2 * HEARTBEAT + 1)
    done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    assert m2n2_main(["evolve", str(cfg), "-o", str(outs[2]), "-n", str(done + 4)]) == 0
    study = optuna.load_study(study_name="m2n2", storage=storage)
    assert study.trials[info["trial"]].state == TrialState.FAIL
    objects = _objects(kind, url, s3_client)
    assert dead_ids[0] not in objects, "the killed trial's upload was not removed"
    arch = check_store(study, objects)
    assert any("m2n2.parents" in study.trials[m].user_attrs for m in arch.members), "no child"
    # Each worker wrote its own reports; the third fetched what it needed into its cache.
    for out in (outs[0], outs[2]):
        assert (out / "best" / "model.safetensors").is_file()
        assert (out / "trials.log").is_file()
        assert len(list((out / "archive").glob("trial_*.safetensors"))) <= CACHE_SIZE
        assert not list((out / "archive").glob(".tmp-*"))
    summary = json.loads((outs[2] / "summary.json").read_text())
    assert summary["best_trial"] == arch.best()
    # optuna-dashboard serves each member as its trial's artifact, given the same store.
    member = next(
        study.trials[m] for m in arch.members if TRIAL_ATTR in study.trials[m].user_attrs
    )
    body = _dashboard_get(storage, url, study, member)
    assert hashlib.sha256(body).hexdigest() == member.user_attrs[TRIAL_ATTR]["sha256"]
    # The store's traffic was recorded and the cache was used both ways.
    traffic = [t.user_attrs[TRAFFIC_ATTR] for t in study.trials if TRAFFIC_ATTR in t.user_attrs]
    assert sum(t["misses"] for t in traffic) > 0 and sum(t["uploaded_bytes"] for t in traffic) > 0
    background = sum(t["background_s"] for t in traffic)
    assert (background > 0) == while_scoring
    if while_scoring:  # some children were not kept; their uploads were dropped (and removed)
        assert sum(t["dropped"] for t in traffic) > 0


def test_damaged_and_missing_artifacts_are_one_line(
    workspace: Path, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A member whose object changed: one line naming the trial and the store, exit 2, when it
    is fetched; a member whose object is gone: the same, at start, before any trial runs."""
    url = _store_url("s3", workspace, "damaged")
    storage = f"sqlite:///{workspace / 'damaged.db'}"
    cfg = _config(workspace, "damaged", url, storage, n_trials=10)
    assert m2n2_main(["evolve", str(cfg), "--no-progress"]) == 0
    study = optuna.load_study(study_name="m2n2", storage=storage)
    objects = _objects("s3", url, s3)
    arch = check_store(study, objects)
    children = [m for m in arch.members if TRIAL_ATTR in study.trials[m].user_attrs]
    assert children, "no child in the archive: nothing to damage"
    capsys.readouterr()

    # Damaged: every child member's object gets other bytes; an empty folder must fetch them.
    for number in children:
        artifact_id = study.trials[number].user_attrs[TRIAL_ATTR]["id"]
        _put("s3", url, s3, artifact_id, objects[artifact_id][:-1] + b"!")
    other = workspace / "out-damaged-elsewhere"
    assert m2n2_main(["evolve", str(cfg), "-o", str(other), "-n", "30", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "is damaged" in err and url in err
    assert any(f"archive member trial {n}:" in err for n in children), err

    # Missing: the object of one member is deleted; the next start stops before any trial.
    _put("s3", url, s3, study.trials[children[0]].user_attrs[TRIAL_ATTR]["id"], None)
    n_before = len(optuna.load_study(study_name="m2n2", storage=storage).trials)
    assert m2n2_main(["evolve", str(cfg), "-n", "40", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"m2n2: error: archive member trial {children[0]}: its artifact "
        f"{study.trials[children[0]].user_attrs[TRIAL_ATTR]['id']} is missing from the archive "
        f"store {url}; restore that object or start a new study"
    )
    study = optuna.load_study(study_name="m2n2", storage=storage)
    assert len(study.trials) == n_before


def test_unreachable_store_is_one_line_and_writes_nothing(
    workspace: Path, s3: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server behind the endpoint, or no such bucket: one line, exit 2, nothing written."""
    import socket

    cfg = _config(workspace, "unreachable", f"s3://{BUCKET}/x", None)
    out = workspace / "out-unreachable"
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert m2n2_main(["evolve", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"m2n2: error: cannot reach the archive store s3://{BUCKET}/x: ")
    assert len(err.splitlines()) == 1 and str(port) in err
    assert not out.exists()

    monkeypatch.undo()
    cfg = _config(workspace, "unreachable", "s3://no-such-bucket/x", None)
    assert m2n2_main(["evolve", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2n2: error: cannot reach the archive store s3://no-such-bucket/x: ")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_a_store_changes_where_members_live_not_the_search(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same config with and without a (folder) store: the same trials, the same best
    model, bit for bit. Without a store nothing of the store is written to the study; a study
    of one kind is refused by a worker of the other, in one line."""
    from m2n2_plugin.search.evolve import evolve

    runs = {}
    early = {"upload_while_scoring": True}
    for name, url, search in (
        ("plain", None, {}),
        ("stored", str(workspace / "store-same"), {}),
        ("early", str(workspace / "store-same-early"), early),
    ):
        cfg = _config(workspace, f"same-{name}", url, None, n_trials=10, **search)
        runs[name] = evolve(cfg, progress=False)
    plain = runs["plain"].study.trials
    for name in ("stored", "early"):
        trials = runs[name].study.trials
        assert [(t.state, t.params, t.values) for t in plain] == [
            (t.state, t.params, t.values) for t in trials
        ]
    out = {k: workspace / f"out-same-{k}" for k in runs}
    best = {k: (out[k] / "best" / "model.safetensors").read_bytes() for k in runs}
    assert best["plain"] == best["stored"] == best["early"]
    # Uploaded while scored: the kept children's objects are exactly the members'.
    folder = workspace / "store-same-early"
    check_store(runs["early"].study, {p.name: p.read_bytes() for p in folder.iterdir()})
    traffic = [t.user_attrs[TRAFFIC_ATTR] for t in runs["early"].study.trials[3:]]
    assert sum(t["dropped"] for t in traffic) > 0, "no child was dropped: nothing tested"
    assert any("m2n2.parents" in t.user_attrs for t in plain)
    assert "m2n2.archive_store" not in runs["plain"].study.user_attrs
    for t in plain:
        assert not {TRIAL_ATTR, TRAFFIC_ATTR} & set(t.user_attrs)
        assert not [k for k in t.system_attrs if k.startswith("artifacts:")]
    assert runs["stored"].study.user_attrs["m2n2.archive_store"] == str(workspace / "store-same")

    capsys.readouterr()
    swapped = {
        "plain": _config(workspace, "same-plain", str(workspace / "store-same"), None),
        "stored": _config(workspace, "same-stored", None, None),
    }
    for cfg in swapped.values():
        assert m2n2_main(["evolve", str(cfg), "-n", "12", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "archive store" in err, err


def test_store_settings_are_checked_in_one_line(tmp_path: Path) -> None:
    """cache_size and upload_while_scoring need a store; a URL of another scheme is
    refused; a relative folder is the config file's folder's, created on first use."""
    from m2n2_plugin.errors import M2N2Error
    from m2n2_plugin.search.archive_store import ArchiveStore
    from m2n2_plugin.search.config import parse_config

    base = {"mergekit_config": "s.yml", "fitness": {"tasks": "t", "metric": "acc"}}
    base["fitness"]["fitness_docs"] = 5
    with pytest.raises(M2N2Error, match=r"search\.cache_size: .*only used with archive_store"):
        parse_config({**base, "search": {"cache_size": 4}}, tmp_path)
    with pytest.raises(M2N2Error, match=r"upload_while_scoring: .*only used with archive_store"):
        parse_config({**base, "search": {"upload_while_scoring": True}}, tmp_path)
    with pytest.raises(M2N2Error, match=r"expected a folder, s3://bucket/prefix or gs://"):
        ArchiveStore.open("ftp://host/x", tmp_path, tmp_path / "out", 2)
    store = ArchiveStore.open("members", tmp_path, tmp_path / "out", 2)
    assert store.url == str(tmp_path / "members") and (tmp_path / "members").is_dir()
    assert not (tmp_path / "out").exists()


def _cached(store: Any, number: int, data: bytes) -> Path:
    """Put a member's copy into a worker's cache, as a fetch or an upload leaves it."""
    from m2n2_plugin.search.workers import member_file

    path = member_file(store.out, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    store.lru[number] = None
    return path


def test_upload_hashes_while_it_transfers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sha256 is computed while the object is written, not before it: the hash waits
    here until the write has begun (hashed first, it would wait in vain and fail)."""
    import threading

    from m2n2_plugin.search import archive_store
    from m2n2_plugin.search.archive_store import ArchiveStore

    store = ArchiveStore.open("objects", tmp_path, tmp_path / "out", 2)
    writing = threading.Event()
    write, sha256_file = store.store.write, archive_store.sha256_file

    def started_write(artifact_id: str, body: Any) -> None:
        writing.set()
        write(artifact_id, body)

    def after_write_began(path: Path) -> str:
        assert writing.wait(20), "the file was hashed before its upload began"
        return sha256_file(path)

    monkeypatch.setattr(store.store, "write", started_write)
    monkeypatch.setattr(archive_store, "sha256_file", after_write_began)
    study = optuna.create_study()
    trial = study.ask()
    data = os.urandom(3 << 20)
    store.upload(trial, _cached(store, trial.number, data))
    meta = study.trials[0].user_attrs[TRIAL_ATTR]
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "objects" / meta["id"]).read_bytes() == data


def test_upload_keeps_the_child_and_drops_the_member_it_displaces(tmp_path: Path) -> None:
    """A full cache after an upload: the child stays (no fetch of this worker's own child)
    and the member whose slot it took goes, not the least recently used member."""
    from m2n2_plugin.search.archive_store import ArchiveStore

    store = ArchiveStore.open("objects", tmp_path, tmp_path / "out", 2)
    study = optuna.create_study()
    old, displaced, child = (study.ask() for _ in range(3))
    kept = _cached(store, old.number, b"least recently used")
    gone = _cached(store, displaced.number, b"displaced")
    store.upload(child, _cached(store, child.number, b"child"), displaced.number)
    assert list(store.lru) == [old.number, child.number]
    assert kept.is_file() and not gone.exists()
    attrs = study.trials[child.number].user_attrs
    hit = store.local_member(child.number, attrs, evicted=lambda: False)
    assert hit.read_bytes() == b"child" and store.traffic.hits == 1
    assert store.traffic.misses == 0


@pytest.mark.parametrize("size", [0, 1000, 4 * 1000 + 17])
def test_fetch_hashes_every_chunk_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A fetch hashes chunk by chunk in a second thread: over many chunks (and none) the
    digest must still be the object's, or every fetch would be refused as damaged."""
    from m2n2_plugin.search import archive_store
    from m2n2_plugin.search.archive_store import ArchiveStore

    monkeypatch.setattr(archive_store, "CHUNK", 1000)  # a 4,017-byte object is 5 chunks
    uploader = ArchiveStore.open("objects", tmp_path, tmp_path / "a", 2)
    study = optuna.create_study()
    trial = study.ask()
    data = os.urandom(size)
    uploader.upload(trial, _cached(uploader, trial.number, data))
    fetcher = ArchiveStore.open("objects", tmp_path, tmp_path / "b", 2)
    path = fetcher.local_member(trial.number, study.trials[0].user_attrs, evicted=lambda: False)
    assert path.read_bytes() == data and fetcher.traffic.misses == 1
    (tmp_path / "b" / "archive" / path.name).unlink()
    fetcher.lru.clear()
    bad = {**study.trials[0].user_attrs[TRIAL_ATTR], "sha256": hashlib.sha256(b"x").hexdigest()}
    with pytest.raises(M2N2Error, match="is damaged"):
        fetcher.local_member(trial.number, {TRIAL_ATTR: bad}, evicted=lambda: False)


def test_upload_while_scoring_keeps_or_drops_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child uploaded while it is scored: kept, it is the trial's one object and in the
    cache; not kept, its object is removed, also when the drop comes mid-transfer (the
    transfer stops at its next read), and no temp file is left."""
    from m2n2_plugin.search.archive_store import ArchiveStore
    from m2n2_plugin.search.workers import member_file

    out = tmp_path / "out"
    store = ArchiveStore.open("objects", tmp_path, out, 2)
    objects = tmp_path / "objects"
    study = optuna.create_study()
    kept, dropped, cut = study.ask(), study.ask(), study.ask()
    data = os.urandom(3 << 20)

    def save(path: Path) -> None:
        path.write_bytes(data)

    pending = store.upload_early(kept, save)
    pending.keep(member_file(out, kept.number), None)
    meta = study.trials[kept.number].user_attrs[TRIAL_ATTR]
    assert (objects / meta["id"]).read_bytes() == data
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert member_file(out, kept.number).read_bytes() == data and kept.number in store.lru
    assert store.traffic.background_s > 0 and store.traffic.dropped == 0

    pending = store.upload_early(dropped, save)
    pending.thread.join()  # uploaded in full before the verdict
    (written,) = get_all_artifact_meta(dropped)
    assert (objects / written.artifact_id).is_file()
    pending.drop()
    pending.drop()  # a second drop (the trial's error path after keep failed) is harmless
    assert not (objects / written.artifact_id).exists()
    assert store.traffic.dropped == 1
    assert study.trials[dropped.number].user_attrs[TRAFFIC_ATTR]["dropped"] == 1

    reads: list[int] = []
    write = store.store.write

    def cut_short(artifact_id: str, body: Any) -> None:
        reads.append(len(body.read(1 << 20)))
        pending.stop.set()  # the verdict arrives mid-transfer
        write(artifact_id, body)

    monkeypatch.setattr(store.store, "write", cut_short)
    pending = store.upload_early(cut, save)
    pending.thread.join()
    assert reads == [1 << 20] and pending.meta is None
    assert type(pending.error).__name__ == "UploadStopped"
    pending.drop()
    assert sorted(p.name for p in objects.iterdir()) == [meta["id"]]
    assert not list((out / "archive").glob(".tmp-*"))
