"""Weights delivered over the LAN: what a coordinator sends a stage, and where the stage keeps it.

The coordinator describes a stage's share of its checkpoint (`manifest`: each tensor's name, its
safetensors header entry and the SHA-256 of each CHUNK_BYTES piece of its bytes, cached under
$HETPIPE_HOME/hashes so a checkpoint is hashed once) and reads it a chunk at a time (`TensorSource`,
memory-mapped: never the whole model in memory). The stage writes what arrives into a `WeightStore`
under $HETPIPE_HOME/weights/<identity>/: each tensor a one-tensor safetensors file, its header
written first, each chunk checked against its hash before it is appended (so every whole chunk on
disk is a checked one, and a cut transfer resumes at the last of them), its own hash (that of its
chunks' hashes) kept in its header's metadata. The store's index of the complete tensors, written
before a load, makes the directory a sharded checkpoint the ordinary loader reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig
from .errors import UserError
from .paths import hetpipe_home
from .weights import checkpoint_files, read_header, stage_tensor_names

CHUNK_BYTES = 8 << 20
INDEX = "model.safetensors.index.json"
WRITE_QUEUE = 4  # checked chunks waiting for the writer thread
DIGEST_KEY = "hetpipe.sha256"  # a delivered tensor file's metadata: its hash (that of its chunks' hashes)


@dataclass(slots=True)
class TensorEntry:
    name: str
    dtype: str  # the safetensors dtype (F32, BF16, U32, ...)
    shape: list[int]
    nbytes: int
    chunks: list[bytes]  # SHA-256 of each CHUNK_BYTES piece of its bytes, in order

    @property
    def digest(self) -> str:
        """The tensor's hash: that of its chunks' hashes."""
        return hashlib.sha256(b"".join(self.chunks)).hexdigest()


def n_chunks(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK_BYTES))


# -- the coordinator's side ------------------------------------------------------------------------

class TensorSource:
    """A checkpoint's tensors' bytes, each file memory-mapped once: `chunk(name, offset)` is a view."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.files = checkpoint_files(model_dir)
        self._open: dict[Path, tuple[dict, memoryview]] = {}

    def data(self, name: str) -> memoryview:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = read_header(path)
        header, data = self._open[path]
        begin, end = header[name]["data_offsets"]
        return data[begin:end]

    def meta(self, name: str) -> dict:
        self.data(name)
        return self._open[self.files[name]][0][name]

    def chunk(self, name: str, offset: int) -> memoryview:
        """Bytes [offset, offset + CHUNK_BYTES) of tensor `name` (fewer at its end), not copied."""
        return self.data(name)[offset : offset + CHUNK_BYTES]


def manifest(source: TensorSource, cfg: ModelConfig, first: int, last: int) -> list[TensorEntry]:
    """The tensors a stage holding layers [first, last] needs, each with its chunks' hashes."""
    wanted = stage_tensor_names(cfg, source.files, first, last)
    hashes = _hash_cache(source.dir)
    out, changed = [], False
    for name in wanted:
        path = source.files[name]
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{name}:{CHUNK_BYTES}"
        data = source.data(name)
        if key not in hashes:
            hashes[key] = [hashlib.sha256(data[o : o + CHUNK_BYTES]).hexdigest()
                           for o in range(0, max(len(data), 1), CHUNK_BYTES)]
            changed = True
        meta = source.meta(name)
        out.append(TensorEntry(name, meta["dtype"], list(meta["shape"]), len(data),
                               [bytes.fromhex(h) for h in hashes[key]]))
    if changed:
        _save_hash_cache(source.dir, hashes)
    return out


def _hash_file(model_dir) -> Path:
    return hetpipe_home() / "hashes" / (hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
                                        + ".json")


def _hash_cache(model_dir) -> dict:
    try:
        return json.loads(_hash_file(model_dir).read_text())
    except (OSError, ValueError):
        return {}


def _save_hash_cache(model_dir, hashes: dict) -> None:
    path = _hash_file(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(hashes))
    os.replace(tmp, path)


# -- the stage's side -----------------------------------------------------------------------------

class WeightStore:
    """A stage's delivered weights for one model (`identity`): a loadable checkpoint directory.

    A chunk is checked on the caller's thread and written, in order, by a writer thread of the
    store's own, so the next chunk's hash runs while the last one goes to disk (at most
    WRITE_QUEUE chunks wait). What `have` says of a tensor being written counts the chunks
    accepted; `flush` waits for them to be on disk."""

    def __init__(self, identity: dict, root: Path | None = None):
        key = f"{identity.get('config')}-{identity.get('weights')}"
        if not all(c.isalnum() or c == "-" for c in key) or len(key) > 80:
            raise UserError("a model identity is two hex hashes")
        self.dir = (root or hetpipe_home() / "weights") / key
        (self.dir / "tensors").mkdir(parents=True, exist_ok=True)
        self._accepted: dict[str, tuple[TensorEntry, int]] = {}  # tensor written here -> bytes accepted
        self._files: dict[str, tuple] = {}  # the writer thread's open partial files, with their header's length
        self._jobs: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._failed: OSError | None = None
        threading.Thread(target=self._write_jobs, name="weight-writer", daemon=True).start()

    def set_config(self, text: str) -> None:
        """The model's config.json, as the coordinator sent it (checked by parsing it)."""
        ModelConfig.from_dict(json.loads(text))
        (self.dir / "config.json").write_text(text)

    def have(self, t: TensorEntry) -> int:
        """Bytes of `t` held: t.nbytes when complete with its hash, else its checked chunks."""
        known = self._accepted.get(t.name)
        if known and known[0] == t:
            return known[1]
        if known:  # the same name, other bytes: let what was queued for it land first
            self.flush()
        done, part = self._path(t), self._path(t, partial=True)
        if done.is_file() and _digest_of(done) == t.digest:
            return t.nbytes
        if not part.is_file():
            return 0
        size = part.stat().st_size - _header_len(part)
        # a chunk cut short is sent again, and so is the last one of a tensor not yet made whole
        return max(0, min(size // CHUNK_BYTES * CHUNK_BYTES, (len(t.chunks) - 1) * CHUNK_BYTES))

    def write(self, t: TensorEntry, offset: int, chunk) -> int:
        """Accept `chunk`, the piece of `t` at data offset `offset` (where `have` says it stops), once
        its hash matches (else a ValueError); returns the bytes now held. It reaches the disk on the
        writer thread; the last chunk completes the tensor (`index` then lists it)."""
        i, rest = divmod(offset, CHUNK_BYTES)
        if rest or i >= len(t.chunks) or len(chunk) != min(CHUNK_BYTES, t.nbytes - offset):
            raise ValueError(f"{t.name}: no chunk of {len(chunk)} bytes at byte {offset} of {t.nbytes}")
        if hashlib.sha256(chunk).digest() != t.chunks[i]:
            raise ValueError("chunk hash mismatch")
        if self._failed:
            self.flush()
        held = self.have(t)
        if held != offset:
            raise ValueError(f"{t.name}: a chunk at byte {offset}, but {held} are held")
        held = offset + len(chunk)
        self._accepted[t.name] = (t, held)
        self._jobs.put((t, offset, chunk))
        return held

    def flush(self) -> None:
        """Wait until every accepted chunk is on disk; a write that failed raises (ValueError), and
        what it left is forgotten (`have` reads the disk again)."""
        self._jobs.join()
        if self._failed:
            e, self._failed = self._failed, None
            self._accepted.clear()
            raise ValueError(f"cannot write the weights under {self.dir}: {e.strerror or e}")

    def index(self) -> None:
        """Write the index of the complete tensors held, so the directory loads as a checkpoint."""
        self.flush()
        suffix = ".safetensors"
        weight_map = {f.name[: -len(suffix)]: f"tensors/{f.name}" for f in (self.dir / "tensors").iterdir()
                      if f.name.endswith(suffix)}
        path = self.dir / INDEX
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        os.replace(tmp, path)

    def close(self) -> None:
        try:
            self.flush()
        except ValueError:
            pass
        self._jobs.put(None)

    # the writer thread ---------------------------------------------------------------------------

    def _write_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            t, offset, chunk = job
            try:
                if not self._failed:
                    self._append(t, offset, chunk)
            except OSError as e:
                self._failed = e
                for f, _ in self._files.values():
                    f.close()
                self._files.clear()
            finally:
                self._jobs.task_done()
        for f, _ in self._files.values():
            f.close()
        self._jobs.task_done()

    def _append(self, t: TensorEntry, offset: int, chunk) -> None:
        f, header_len = self._files.get(t.name, (None, 0))
        if f is None or f.tell() != header_len + offset:
            if f is not None:
                f.close()
            f, header_len = self._files[t.name] = self._open_part(t, offset)
        f.write(chunk)
        if offset + len(chunk) == t.nbytes:
            f.close()
            del self._files[t.name]
            os.replace(self._path(t, partial=True), self._path(t))

    def _open_part(self, t: TensorEntry, offset: int) -> tuple:
        """The partial file of `t`, positioned at data byte `offset` (what lies past it is dropped),
        and its header's length."""
        part = self._path(t, partial=True)
        if offset == 0:
            f = open(part, "wb")
            f.write(_single_header(t))
        else:
            f = open(part, "r+b")
            f.truncate(_header_len(part) + offset)
            f.seek(0, os.SEEK_END)
        return f, f.tell() - offset

    def _path(self, t: TensorEntry, partial: bool = False) -> Path:
        return self.dir / "tensors" / (t.name + ".safetensors" + (".partial" if partial else ""))


def _digest_of(path: Path) -> str | None:
    """The tensor hash a delivered file's header keeps in its metadata."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n)).get("__metadata__", {}).get(DIGEST_KEY)
    except (OSError, ValueError, struct.error):
        return None


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(8)
    return 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else 0


def _single_header(t: TensorEntry) -> bytes:
    """A one-tensor safetensors header (padded to 8 bytes, as the format asks)."""
    body = json.dumps({"__metadata__": {DIGEST_KEY: t.digest},
                       t.name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": [0, t.nbytes]}}).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
