"""The challenge's token shard format and atomic file writes, shared by the tools.

A shard is a header of 256 little-endian int32 (magic, version, number of tokens, then
zeros) followed by that many little-endian uint16 token ids. Datasets name their shards
fineweb_val_000000.bin, fineweb_train_000000.bin, fineweb_train_000001.bin, ... A CaseOps dataset
also has a byte sidecar beside each validation shard, fineweb_val_bytes_000000.bin, ...: the same
format, holding for each token of that shard the original UTF-8 bytes it stands for (see
caseops.py). The sidecar's name matches the glob fineweb_val_*.bin, so `shard_paths` leaves it out.

The scripts in data/ import this module by name; bench/ and records/ put this folder on
sys.path to import it too. They all read shard headers with `read_header` and write their
files with `write_bytes_atomic` / `write_text_atomic`. train_gpt.py keeps its own shard
loader and atomic write (it is submitted as one self-contained file), so a change to the
format here must be made there as well.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520  # the value llm.c and the challenge write into header[0]
SHARD_VERSION = 1
HEADER_INT32 = 256
HEADER_BYTES = HEADER_INT32 * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB_SIZE = 1 << 16  # token ids are stored as uint16
SPLITS = ("val", "train")


class ShardError(ValueError):
    """A file that is not a well-formed shard."""


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_default_permissions(fd_or_path: int | Path, is_dir: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only entries; give them the permissions a plain
    open()/mkdir() would have, since they become the published files."""
    mode = (0o777 if is_dir else 0o666) & ~current_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)


def temp_file_beside(path: Path) -> tuple[int, Path]:
    """A new hidden temporary file in `path`'s folder (so that os.replace onto `path` is a
    rename), with the permissions a plain open() would give: (its descriptor, its path)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    set_default_permissions(fd)
    return fd, Path(tmp_name)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` so that a reader sees the old file or the whole new one, never
    half of it: a temporary file beside it, flushed to disk, then renamed over it. The
    temporary file is removed if anything fails; missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic for text, stored as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def display_path(path: Path) -> str:
    """A path as the user should see it: relative to the working directory when possible."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)


def shard_name(split: str, index: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def byte_sidecar_name(index: int) -> str:
    """The byte sidecar of validation shard `index` (the records' name for it)."""
    return f"fineweb_val_bytes_{index:06d}.bin"


def numbered_files(dataset_dir: Path, prefix: str) -> list[Path]:
    """`{prefix}NNNNNN.bin` in the folder, in order; other names that start with it are not."""
    numbered = re.compile(re.escape(prefix) + r"[0-9]+\.bin")
    paths = Path(dataset_dir).glob(f"{prefix}*.bin")
    return sorted(p for p in paths if numbered.fullmatch(p.name))


def shard_paths(dataset_dir: Path, split: str) -> list[Path]:
    """The token shards of a split, in order (not the byte sidecars)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return numbered_files(dataset_dir, f"fineweb_{split}_")


def byte_sidecar_paths(dataset_dir: Path) -> list[Path]:
    """The byte sidecars of a CaseOps dataset's validation shards, in order."""
    return numbered_files(dataset_dir, "fineweb_val_bytes_")


def make_header(num_tokens: int) -> bytes:
    if not 0 <= num_tokens < 1 << 31:
        raise ValueError(f"a shard holds 0 to 2**31 - 1 tokens, got {num_tokens}")
    header = np.zeros(HEADER_INT32, dtype="<i4")
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = num_tokens
    return header.tobytes()


def read_header(path: Path) -> int:
    """Checks the header and the file size of a shard; returns its number of tokens."""
    path = Path(path)
    size_bytes = path.stat().st_size
    if size_bytes < HEADER_BYTES:
        raise ShardError(
            f"{path}: {size_bytes} bytes, shorter than the {HEADER_BYTES}-byte shard header"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INT32)
    if int(header[0]) != SHARD_MAGIC or int(header[1]) != SHARD_VERSION:
        raise ShardError(
            f"{path}: header starts with magic {int(header[0])}, version {int(header[1])}; "
            f"a shard has magic {SHARD_MAGIC}, version {SHARD_VERSION}"
        )
    num_tokens = int(header[2])
    expected_bytes = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if num_tokens < 0 or size_bytes != expected_bytes:
        raise ShardError(
            f"{path}: header says {num_tokens} tokens ({expected_bytes} bytes) but the file has "
            f"{size_bytes} bytes"
        )
    return num_tokens


def read_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 array mapped from the file."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


class ShardWriter:
    """Writes one shard incrementally; the file appears under its final name only on close().

    Memory stays at the size of the arrays passed to append(), whatever the shard size.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.num_tokens = 0
        fd, self._tmp_path = temp_file_beside(self.path)
        self._file = os.fdopen(fd, "wb")
        self._file.write(make_header(0))  # rewritten with the real count on close()

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.dtype != TOKEN_DTYPE:
            if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB_SIZE):
                raise ValueError(
                    f"{self.path}: token ids must fit in uint16 (0..{MAX_VOCAB_SIZE - 1})"
                )
            tokens = tokens.astype(TOKEN_DTYPE)
        self._file.write(tokens.tobytes())
        self.num_tokens += int(tokens.size)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(make_header(self.num_tokens))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Writes a whole shard atomically (temporary file in the same folder, then rename)."""
    with ShardWriter(path) as writer:
        writer.append(tokens)
