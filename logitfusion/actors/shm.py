"""Logits in shared memory between a model worker and a client on the same host (worker.proto: shared_memory).

At V = 128k and 16 rows a step's fp32 logits are 8 MB per model. Through protobuf and gRPC they are copied about
five times (tensor -> bytes, serialisation, the socket both ways, parsing) and framed by HTTP/2. When the worker and
its client share a memory filesystem (/dev/shm: the same host, and the same container or pod), the worker writes
them once into a file of its stream's ring and the message carries only the file's name; the client copies them
out once. Across hosts, or between containers with their own /dev/shm, everything stays in the message.

- **Identity** (no file): ``boot_id:st_dev:st_ino:uid`` of the shared directory, which the worker reports in
  RunnerInfo. The kernel's boot id names the host, the directory's device and inode name the mounted filesystem
  (two tmpfs mounts never share a device number while mounted), and the uid makes sure the client may open the
  worker's 0600 files. A client that computes the same identity sees the worker's files.
- **Ring** (worker, one per Step stream): two files ``lf-<pid>-<stream>-<slot>-<generation>``, used in turn, grown
  (as a new generation) when a step's logits do not fit. The client copies a response's logits out before it sends
  the next request of the stream, and keeps at most SLOTS shared requests out, so a slot is never written while it
  is read. Files are created 0600 with their pages reserved and unlinked when the stream closes; files of
  processes that no longer exist (a worker killed mid-stream) are swept when a worker starts.
- **Reader** (client): maps each file once (read-only), checks that the name is a worker's file in the shared
  directory and that the file holds the bytes the message claims, and copies the rows out.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import threading
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SHM_DIR = Path(os.environ.get("LOGITFUSION_SHM_DIR", "/dev/shm"))
_NAME = re.compile(r"lf-(\d+)-[0-9a-f]{1,64}-[01]-\d{1,9}")
SLOTS = 2  # slots per stream's ring; a client keeps at most this many shared-memory requests out


def enabled() -> bool:
    """Shared memory is offered and used unless LOGITFUSION_SHM=0, and only where the directory exists."""
    off = os.environ.get("LOGITFUSION_SHM", "1").strip().lower() in ("0", "false", "no", "off")
    return not off and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def _create(path: Path, size: int) -> tuple[int, mmap.mmap]:
    """A new file of `size` bytes, its pages reserved: on a full memory filesystem this raises OSError (ENOSPC)
    here, where a sparse file would kill the writer with SIGBUS on its first store past the limit."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise


def sweep_stale() -> int:
    """Unlink this module's files whose creating process no longer exists (a worker killed without cleanup).
    Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = _NAME.fullmatch(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal: leave it)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            (SHM_DIR / name).unlink()
            removed += 1
        except OSError:
            pass
    return removed


def identity() -> str:
    """This process's view of the shared directory: ``boot_id:st_dev:st_ino:uid``, or "" where shared memory is off
    or the host's boot id cannot be read (then it is never used)."""
    if not enabled():
        return ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return ""
    return f"{boot}:{st.st_dev}:{st.st_ino}:{os.getuid()}" if boot else ""


def same_memory(directory: str, worker_identity: str) -> bool:
    """Whether a worker that reported (directory, worker_identity) writes files this process can read."""
    return bool(worker_identity) and directory == str(SHM_DIR) and worker_identity == identity()


class Ring:
    """A Step stream's shared-memory slots on the worker side."""

    def __init__(self, stream_id: str) -> None:
        key = re.sub(r"[^0-9a-f]", "", stream_id.lower())[:64] or secrets.token_hex(8)
        self._prefix = f"lf-{os.getpid()}-{key}"
        self._slots: list[tuple[Path, int, mmap.mmap] | None] = [None] * SLOTS
        self._generation = 0
        self._next = 0
        self._lock = threading.Lock()
        self._closed = False

    def write(self, tensor: torch.Tensor) -> str:
        """Copy a CPU tensor's bytes into the next slot; returns the slot's path."""
        data = tensor.detach().contiguous()
        nbytes = data.numel() * data.element_size()
        with self._lock:
            if self._closed:
                raise OSError("the stream's shared memory is closed")  # the caller answers in the message
            i = self._next
            self._next = (i + 1) % SLOTS
            slot = self._slots[i]
            if slot is None or len(slot[2]) < nbytes:
                self._drop(i)
                self._generation += 1
                size = max(nbytes, 1 << 16, 0 if slot is None else 2 * len(slot[2]))  # grow geometrically
                path = SHM_DIR / f"{self._prefix}-{i}-{self._generation}"
                fd, mm = _create(path, size)
                slot = (path, fd, mm)
                self._slots[i] = slot
            path, _, mm = slot
            if nbytes:
                view = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
                view.copy_(data.view(-1).view(torch.uint8))
            return str(path)

    def _drop(self, i: int) -> None:
        slot = self._slots[i]
        self._slots[i] = None
        if slot is None:
            return
        path, fd, mm = slot
        try:
            mm.close()
        except BufferError:  # a view still exported: the mapping goes with it
            pass
        os.close(fd)
        path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for i in range(SLOTS):
                self._drop(i)


class Reader:
    """The client side: validated, mapped once, copied out."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}
        self._lock = threading.Lock()

    def read(self, path: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor owning its memory, copied from the first prod(shape) elements of the worker's file. Raises
        ValueError naming the problem (a path outside the shared directory, a missing or short file)."""
        name = os.path.basename(path)
        if os.path.dirname(path) != str(SHM_DIR) or not _NAME.fullmatch(name):
            raise ValueError(f"shared_memory_path {path!r}: not a worker's logits file in {SHM_DIR}")
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        with self._lock:
            mm = self._mapped(path, nbytes)
            if nbytes:
                with warnings.catch_warnings():  # a read-only mapping: torch warns that the view is not writable
                    warnings.simplefilter("ignore", UserWarning)
                    src = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
                out.view(-1).view(torch.uint8).copy_(src)
                del src
        return out

    def _mapped(self, path: str, nbytes: int) -> mmap.mmap:
        entry = self._maps.get(path)
        if entry is not None and len(entry[1]) >= nbytes:
            return entry[1]
        if entry is not None:
            self._forget(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ValueError(f"shared_memory_path {path!r}: cannot open: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"shared_memory_path {path!r}: {size} bytes, the logits need {nbytes}")
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        if len(self._maps) >= 4 * SLOTS:  # older generations: their files are gone
            for old in list(self._maps)[: len(self._maps) - 2 * SLOTS]:
                self._forget(old)
        self._maps[path] = (fd, mm)
        return mm

    def _forget(self, path: str) -> None:
        fd, mm = self._maps.pop(path)
        try:
            mm.close()
        except BufferError:
            pass
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            for path in list(self._maps):
                self._forget(path)
