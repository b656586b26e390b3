"""Reading model checkpoints: safetensors headers, and one tensor at a time.

:func:`read_header` is the package's one safetensors header reader: the layout
(:mod:`m2n2_plugin.merge.layout`) takes tensor shapes from it, the seed checks take them from
it, and
:class:`Checkpoint` finds each tensor's bytes with it. Tensors are read with positioned reads
(``os.preadv``) into memory the caller owns, not through ``safetensors.safe_open``: ``safe_open``
memory-maps the file, and every page a merge touches stays in the process's resident set until
the file is closed (see :mod:`m2n2_plugin.merge.resident`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from typing import Literal

import torch

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.kernel import squared_norm

__all__ = ["IO", "Checkpoint", "checkpoint_shapes", "read_header", "tensor_files"]

#: A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


# --------------------------------------------------------------------------------------------
# Reading shapes: safetensors headers, never the weights.


def tensor_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (one file or an index of shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise M2N2Error(f"{index} is damaged (not a safetensors index: {exc})") from exc
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise M2N2Error(f"model {str(path)!r} has no safetensors weights")
    return found


def read_header(path: Path, fd: int | None = None) -> tuple[int, dict[str, Any]]:
    """The safetensors header of ``path`` (read through ``fd`` if open) and where data starts.

    The format: an 8-byte little-endian header length, then that many bytes of JSON mapping
    each tensor name to its dtype, shape and byte range (plus an optional ``__metadata__``).
    """
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY)
        assert fd is not None
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise M2N2Error(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise M2N2Error(f"{path} is not a safetensors file (header of {length} bytes)")
        header = json.loads(os.pread(fd, length, 8))
        size = os.fstat(fd).st_size
    except FileNotFoundError as exc:
        raise M2N2Error(f"{path} is missing") from exc
    except OSError as exc:
        raise M2N2Error(f"cannot read {path} ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise M2N2Error(f"{path} is not a safetensors file (bad header)") from exc
    finally:
        if own and fd is not None:
            os.close(fd)
    if not isinstance(header, dict):
        raise M2N2Error(f"{path} is not a safetensors file (bad header)")
    # A file cut short (a full disk, an interrupted copy) keeps its header: check the data.
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if size != 8 + length + max(ends, default=0):
        raise M2N2Error(
            f"{path} is damaged (truncated: {size} bytes, the header describes "
            f"{8 + length + max(ends, default=0)})"
        )
    return 8 + length, header


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a model folder or one safetensors file, from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in tensor_files(path) if path.is_dir() else [path]:
        _, header = read_header(file)
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(x) for x in info["shape"])
    return shapes


IO = Literal["read", "mmap"]

# safetensors dtype codes (the format's spec) that torch can hold.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class NormMemo:
    """Squared norms of parent tensors, remembered per file version for the next merges.

    Keyed by (device, inode, size, mtime) -> {(tensor, dtype read as, device type): |x|^2}.
    Archive files are written once under a fresh name and never changed, so a member merged
    again (it is a parent many times) needs only the <a, b> pass. The caller that merges many
    children (``m2n2 evolve``: one per run) holds one and lends it to every :class:`Checkpoint`;
    the oldest files' entries go first beyond ``files`` (a few hundred floats per file).
    """

    def __init__(self, files: int = 256) -> None:
        self.files = files
        self._norms: OrderedDict[tuple[int, ...], dict[tuple[str, torch.dtype, str], float]]
        self._norms = OrderedDict()
        self._lock = threading.Lock()  # mergekit's executor may read parents from threads

    def __len__(self) -> int:
        """How many file versions have norms remembered."""
        with self._lock:
            return len(self._norms)

    def get(self, version: tuple[int, ...], key: tuple[str, torch.dtype, str]) -> float | None:
        with self._lock:
            return self._norms.get(version, {}).get(key)

    def put(
        self, version: tuple[int, ...], key: tuple[str, torch.dtype, str], norm: float
    ) -> None:
        with self._lock:
            self._norms.setdefault(version, {})[key] = norm
            self._norms.move_to_end(version)
            while len(self._norms) > self.files:
                self._norms.popitem(last=False)


def write_safetensors(tensors: Mapping[str, torch.Tensor], fd: int) -> None:
    """Write ``tensors`` (any device) as a safetensors file to ``fd``, one tensor at a time.

    ``safetensors.torch.save_file`` needs every tensor in host memory at once: for a model on a
    GPU that is a whole model of host RSS per saved child. Here the header is written from the
    shapes, then each tensor is copied to the host and written, so the host holds one tensor.
    Readers (ours, safetensors, transformers) accept the layout: tensors in the given order,
    an 8-byte aligned header padded with spaces, ``{"format": "pt"}`` metadata.
    """
    codes = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in codes:
            raise M2N2Error(f"tensor {name!r}: dtype {tensor.dtype} cannot be saved")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": codes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.write(fd, struct.pack("<Q", len(text)) + text)
    for tensor in tensors.values():
        host = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        view = memoryview(host.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


# --------------------------------------------------------------------------------------------
# Reading a checkpoint one tensor at a time.


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are: file, absolute offset, size, and how to read them."""

    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plain_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.is_contiguous()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data


class Checkpoint:
    """The tensors of a model folder (one or sharded safetensors) or of one safetensors file.

    Only the headers are read when it opens; :meth:`get` reads one tensor when asked. Use it as
    a context manager: the files stay open (and, with ``io="mmap"``, mapped) until it closes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        io: IO = "read",
        scratch: dict[torch.dtype, torch.Tensor] | None = None,
        *,
        pin_memory: bool = False,
        norms: NormMemo | None = None,
    ) -> None:
        if io not in ("read", "mmap"):
            raise ValueError(f"io must be 'read' or 'mmap', got {io!r}")
        self.path = Path(path)
        self.io = io
        if self.path.is_dir():
            self.files = tensor_files(self.path)
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise M2N2Error(f"model {str(self.path)!r} not found (no such file or folder)")
        self.entries: dict[str, _Entry] = {}
        # Every file is opened now: a file deleted later (an evicted archive member) stays
        # readable through its open descriptor until this checkpoint closes.
        self._fds: list[int] = []
        self._versions: list[tuple[int, ...]] = []
        self._mapped: dict[int, Any] = {}
        # dtype -> byte buffer for ``reuse`` reads; the caller may lend one that outlives us.
        self._scratch = {} if scratch is None else scratch
        # Page-locked scratch buffers when tensors go on to a GPU: a copy from pageable memory
        # is staged through a driver buffer (about half the bandwidth).
        self._pin = pin_memory
        # Squared norms already computed for these files' versions (None: none kept).
        self._norms = norms
        try:
            for index, file in enumerate(self.files):
                try:
                    self._fds.append(os.open(file, os.O_RDONLY))
                except OSError as exc:
                    raise M2N2Error(f"cannot read {file} ({exc.strerror})") from exc
                st = os.fstat(self._fds[index])
                self._versions.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                self._add_entries(index, file, *read_header(file, self._fds[index]))
                if io == "mmap":
                    self._safe_open(index)
        except BaseException:
            self.close()
            raise

    def _add_entries(
        self, index: int, file: Path, data_start: int, header: Mapping[str, Any]
    ) -> None:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise M2N2Error(f"{file}: tensor {name!r} has unsupported dtype {info!r}")
            if name in self.entries:
                raise M2N2Error(f"{self.path}: tensor {name!r} is stored twice")
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise M2N2Error(f"{file}: tensor {name!r} has a bad size in the header")
            self.entries[name] = _Entry(index, dtype, shape, data_start + begin, nbytes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` in the files' header order."""
        return {name: entry.shape for name, entry in self.entries.items()}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the files (unmapping them) and let go of the scratch buffers."""
        while self._fds:
            os.close(self._fds.pop())
        self._mapped.clear()
        self._scratch = {}  # a lent scratch stays with its owner

    def _safe_open(self, file: int) -> Any:
        handle = self._mapped.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.files[file]), framework="pt")
            self._mapped[file] = handle
        return handle

    def _read_into(self, entry: _Entry, dest: torch.Tensor) -> None:
        """Copy the stored bytes into ``dest`` (contiguous, CPU, the stored dtype)."""
        if entry.nbytes == 0:
            return
        fd = self._fds[entry.file]
        view = _byte_view(dest)
        done = 0
        while done < entry.nbytes:
            count = os.preadv(fd, [view[done:]], entry.start + done)
            if count <= 0:
                raise M2N2Error(f"{self.files[entry.file]} is truncated")
            done += count

    def _raw(self, name: str, entry: _Entry, reuse: bool) -> torch.Tensor:
        """The tensor as stored; with ``reuse`` it lives in this checkpoint's scratch buffer
        (valid until the next ``reuse`` read), so that reading many tensors allocates once."""
        if self.io == "mmap":
            return self._safe_open(entry.file).get_tensor(name)
        if not reuse:
            dest = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            storage = self._scratch.get(entry.dtype)
            if storage is None or storage.numel() < entry.numel:
                size = max(e.numel for e in self.entries.values() if e.dtype == entry.dtype)
                storage = torch.empty(size, dtype=entry.dtype, pin_memory=self._pin)
                self._scratch[entry.dtype] = storage
            dest = storage[: entry.numel].view(entry.shape)
        self._read_into(entry, dest)
        return dest

    def get(
        self,
        name: str,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        reuse: bool = False,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Tensor ``name``, cast to ``dtype`` if given.

        With ``out`` the value is written into ``out`` (cast to its dtype; on ``out``'s device)
        and ``out`` returned; when ``out`` is a CPU tensor of the stored dtype the bytes are read
        straight into it. Without ``out``, with ``reuse`` it may live in a scratch buffer that
        the next ``reuse`` read overwrites. ``device`` (without ``out``): the tensor is copied
        there as stored, then cast there, so only one tensor's bytes pass through host memory
        (the scratch buffer) and the cast runs on the device.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise M2N2Error(f"{self.path} has no tensor {name!r}")
        target = dtype or entry.dtype
        if out is not None:
            if tuple(out.shape) != entry.shape:
                raise M2N2Error(
                    f"tensor {name!r} is {entry.shape} in {self.path} but {tuple(out.shape)} "
                    "in the model"
                )
            if self.io == "read" and out.dtype == entry.dtype == target and plain_cpu(out):
                self._read_into(entry, out)
                return out
        raw = self._raw(name, entry, reuse=reuse or out is not None)
        where = out.device if out is not None else device
        if where is not None and where.type != "cpu":
            # Host -> device as stored (the scratch may be reused as soon as this returns:
            # the copy is synchronous), then the cast on the device.
            raw = raw.to(where)
        value = raw if raw.dtype == target else raw.to(target)
        if out is None:
            return value
        out.copy_(value)
        return out

    def squared_norm(self, name: str, value: torch.Tensor) -> float:
        """``kernel.squared_norm(value)`` for ``value`` = tensor ``name`` as read from this
        checkpoint (in ``value``'s dtype), remembered for this version of the file in the
        :class:`NormMemo` lent to this checkpoint, if any."""
        if self._norms is None:
            return squared_norm(value)
        version = self._versions[self.entries[name].file]
        # The device is part of the key: a GPU sums in another order (other last bits), and a
        # CPU merge must give the same bits whatever ran before it in the process.
        key = (name, value.dtype, value.device.type)
        known = self._norms.get(version, key)
        if known is not None:
            return known
        norm = squared_norm(value)
        self._norms.put(version, key, norm)
        return norm
