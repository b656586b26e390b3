"""Where an archive member's bytes go: an Optuna artifact store named by a URL.

:func:`artifact_store` opens ``search.archive_store`` (a folder, ``s3://bucket/prefix`` or
``gs://bucket/prefix``) as a :class:`MemberStore`, which optuna-dashboard takes as well;
:class:`TrialUpload` is how one trial writes its object into it. What a worker does with the
store -- uploads, its cache, removals -- is :mod:`m2n2_plugin.search.archive_store`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound

from m2n2_plugin.errors import M2N2Error

#: Trial user attr: the id of the object this trial is writing or wrote (see TrialUpload).
UPLOADING_ATTR = "m2n2.uploading"
#: Bytes read or hashed at a time.
CHUNK = 8 << 20


class UploadStopped(Exception):
    """An upload cut short because its child is not kept (:class:`EarlyUpload`)."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MemberStore:
    """An Optuna artifact store named by a URL, keys under the URL's prefix.

    Implements Optuna's ``ArtifactStore`` protocol (``open_reader``, ``write``, ``remove``),
    so ``upload_artifact`` and optuna-dashboard take it as they take Optuna's own stores;
    Boto3ArtifactStore and GCSArtifactStore have no key prefix, hence this wrapper. Also
    :meth:`check` (is the store there at all) and :meth:`exists`, which the protocol lacks.
    """

    def __init__(self, url: str, inner: Any, kind: str, prefix: str = "") -> None:
        self.url = url
        self.inner = inner
        self.kind = kind
        self.prefix = prefix

    def key(self, artifact_id: str) -> str:
        return self.prefix + artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(self.key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(self.key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(self.key(artifact_id))

    def exists(self, artifact_id: str) -> bool:
        """Whether the object is there (its metadata only: no download)."""
        key = self.key(artifact_id)
        if self.kind == "s3":
            from botocore.exceptions import ClientError

            try:
                self.inner.client.head_object(Bucket=self.inner.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise
            return True
        if self.kind == "gs":
            return bool(self.inner.bucket_obj.blob(key).exists())
        try:
            self.inner.open_reader(key).close()
        except ArtifactNotFound:
            return False
        return True

    def check(self) -> None:
        """Raise if the store cannot be used: no bucket, no credentials, no server, no folder."""
        if self.kind == "s3":
            self.inner.client.head_bucket(Bucket=self.inner.bucket)
        elif self.kind == "gs":
            self.inner.bucket_obj.reload()
        else:
            folder = Path(self.url)
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"{folder} is not writable")


def artifact_store(url: str, base_dir: Path | None = None) -> MemberStore:
    """The store that ``search.archive_store: url`` names, not yet contacted.

    ``s3://bucket/prefix``: boto3's S3 client, configured the usual boto3 way (endpoint from
    ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` or ``~/.aws/config``, credentials from the
    environment, ``~/.aws`` or an instance role), so MinIO and other S3-compatible stores work.
    ``gs://bucket/prefix``: google-cloud-storage's default client. Anything else is a folder
    (relative to ``base_dir``). Also what to hand optuna-dashboard::

        optuna_dashboard.run_server(storage_url, artifact_store=artifact_store(url))
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        folder = Path(url).expanduser()
        if not folder.is_absolute():
            folder = (base_dir or Path.cwd()) / folder
        return MemberStore(str(folder), FileSystemArtifactStore(folder), "folder")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    prefix = prefix + "/" if prefix else ""
    if not bucket or scheme not in ("s3", "gs"):
        raise M2N2Error(
            f"search.archive_store {url!r}: expected a folder, s3://bucket/prefix or "
            "gs://bucket/prefix"
        )
    if scheme == "s3":
        try:
            import boto3
        except ImportError as exc:
            raise M2N2Error(
                f"search.archive_store {url!r} needs boto3: pip install 'm2n2-plugin[s3]'"
            ) from exc
        from optuna.artifacts import Boto3ArtifactStore

        # avoid_buf_copy: stream the file; the default copies the whole model into memory.
        inner: Any = Boto3ArtifactStore(bucket, boto3.client("s3"), avoid_buf_copy=True)
        return MemberStore(url, inner, "s3", prefix)
    try:
        from google.cloud import storage as gcs
    except ImportError as exc:
        raise M2N2Error(
            f"search.archive_store {url!r} needs google-cloud-storage: "
            "pip install 'm2n2-plugin[gcs]'"
        ) from exc
    from optuna.artifacts import GCSArtifactStore

    return MemberStore(url, GCSArtifactStore(bucket, gcs.Client()), "gs", prefix)


class TrialUpload:
    """The artifact-store protocol for one trial's upload: records the object's id in the
    trial (user attr :data:`UPLOADING_ATTR`) before its first byte is written.

    ``upload_artifact`` records an artifact in the trial only after writing it (Optuna 5.1),
    so a worker killed mid-upload would leave an object nobody knows of; with this record
    ``sync`` removes it like any other object of a failed trial. ``stop``: once set, the
    write ends at its next read of the file (boto3 reads a part at a time and aborts its
    multipart upload on the error; a folder store's copy ends mid-file).
    """

    def __init__(
        self, store: MemberStore, trial: optuna.Trial, stop: threading.Event | None
    ) -> None:
        self.store = store
        self.trial = trial
        self.stop = stop

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.trial.set_user_attr(UPLOADING_ATTR, artifact_id)
        body = content_body if self.stop is None else _StoppableReader(content_body, self.stop)
        self.store.write(artifact_id, body)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.store.open_reader(artifact_id)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(artifact_id)


class _StoppableReader:
    """``body`` with a ``read`` that raises :class:`UploadStopped` once ``stop`` is set."""

    def __init__(self, body: BinaryIO, stop: threading.Event) -> None:
        self.body = body
        self.stop = stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise UploadStopped("the child is not kept")
        return self.body.read(size)

    def __getattr__(self, name: str) -> Any:  # seek, tell, seekable, readable, close
        return getattr(self.body, name)


def trial_objects(frozen: optuna.trial.FrozenTrial, storage: Any) -> list[str]:
    """The ids of every object a trial wrote or began to write: its artifacts, and the one
    recorded before its upload began (a worker killed mid-upload has no artifact yet)."""
    ids = [m.artifact_id for m in get_all_artifact_meta(frozen, storage=storage)]
    started = frozen.user_attrs.get(UPLOADING_ATTR)
    return ids + [started] if isinstance(started, str) and started not in ids else ids


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
