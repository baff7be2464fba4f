"""Build a challenge-format dataset (SentencePiece tokenizer + token shards) from local text.

    python data/build_dataset.py                                   # offline corpus, see below
    python data/build_dataset.py --docs docs.jsonl --vocab-size 4096
    python data/build_dataset.py --docs notes/ --name notes --val-docs 20
    python data/build_dataset.py --docs data/datasets/docs_selected.jsonl --name fineweb10B_retok \
        --vocab-size 8192 --tokenizer-train-docs 5000000            # the SP8192 records' recipe
    python data/build_dataset.py --caseops                         # the same over CaseOps text

With no --docs, the documents are the docstrings and comments of the Python standard
library and of the installed packages, plus the pydoc topics: text that every Python
installation carries, so a machine without network can run the whole pipeline. Files are
visited in a fixed shuffled order and the corpus is capped (--max-bytes), so the result is
the same on every run of the same installation.

Output, under --out-root (default: this folder):
    datasets/<name>_sp<V>/fineweb_val_000000.bin     the first --val-docs documents
    datasets/<name>_sp<V>/fineweb_train_000000.bin   the other documents, in order
    datasets/<name>_sp<V>/manifest.json              counts, sha256 of the document list
    tokenizers/<name>_<V>_bpe.model (+ .vocab)       unless --tokenizer reuses one
With --caseops the documents are encoded with the CaseOps case transform (caseops.py) first, the
tokenizer holds its four markers as single pieces, the names get "_caseops"
(datasets/<name>_caseops_sp<V>/, tokenizers/<name>_caseops_<V>_bpe.model), and each validation
shard has a byte sidecar, fineweb_val_bytes_000000.bin, ...: the original UTF-8 bytes of each
token, so that bits per byte are still counted on the original text.
Every document is stored as [BOS] + its tokens. The first --val-docs documents are the
validation split (default: the challenge's 50,000 for a corpus of at least 500,000
documents, else a tenth of it), all later ones the training split. The tokenizer is trained
on training documents only, so validation text is never seen before it is scored.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

import caseops
from shard_format import (
    HEADER_INT32,
    MAX_VOCAB_SIZE,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_DTYPE,
    ShardWriter,
    byte_sidecar_name,
    display_path,
    set_default_permissions,
    shard_name,
    write_text_atomic,
)

DATA_DIR = Path(__file__).resolve().parent

PYDOCS_NAME = "pydocs"
DEFAULT_VOCAB_SIZE = 1024
# A few million tokens: enough to train a small model, quick to build on two CPU cores.
PYDOCS_MAX_BYTES = 8_000_000
# About 200k validation tokens: a stable score that a CPU evaluates in seconds.
PYDOCS_VAL_DOCS = 100
PYDOCS_SHUFFLE_SEED = 1337
# Generated tables and vendored bundles: slow to parse and nearly free of prose.
PYDOCS_MAX_FILE_BYTES = 2_000_000
# the challenge scores the first 50,000 documents of docs_selected.jsonl
CHALLENGE_VAL_DOCS = 50_000
# A corpus of fewer than ten times that many documents gives a tenth of them to validation.
SMALL_CORPUS_VAL_FRACTION = 10
# Bytes of text a validation token is assumed to cover when the split must hold --min-tokens:
# about twice what the tokenizers here average (2.4 to 3.9 bytes a token at vocab 1024 to 8192).
VAL_BYTES_PER_TOKEN = 8
# One sequence of the trainer's default TRAIN_SEQ_LEN (1024) plus the target of its last token.
DEFAULT_MIN_TOKENS = 1025
DEFAULT_SHARD_TOKENS = 100_000_000  # the published shards' size
DEFAULT_TOKENIZER_TRAIN_BYTES = 50_000_000  # when --tokenizer-train-docs is not given
BOS_ID = 1
DOC_SUFFIXES = (".txt", ".md")

# The challenge's SentencePiece settings (its data export uses the same ones).
SPM_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# A CaseOps tokenizer also holds the transform's markers as single pieces (ids 4 to 7, as in the
# records' tokenizer), so that a marker is always one token and never part of another.
CASEOPS_USER_SYMBOLS = (caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESC)
# The byte sidecar holds uint16 counts, like the token ids.
MAX_TOKEN_BYTES = (1 << 16) - 1
# SentencePiece skips training sentences longer than its max_sentence_length (4192 bytes),
# so documents are fed to it in line-aligned chunks below that size.
SPM_SENTENCE_BYTES = 4096
# The learned pieces do not depend on the thread count, but the .model file records it:
# a fixed value keeps the file byte-identical across machines.
SPM_TRAIN_THREADS = 4
ENCODE_BATCH_DOCS = 512
ENCODE_BATCH_BYTES = 8_000_000
CASEOPS_SIDECAR_RULE = (
    "fineweb_val_bytes_N.bin holds one count per token of fineweb_val_N.bin, in the shard "
    "format: the UTF-8 bytes of the original (untransformed) document that the token stands "
    "for; 0 for BOS and for the markers (a marker character that ESC escapes is text: 3); a "
    "document's counts add up to its UTF-8 length"
)
DOCS_SHA256_SCHEME = (
    "sha256 over the documents in order, each as its UTF-8 length (8-byte little-endian) then its "
    "UTF-8 bytes"
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class DatasetError(Exception):
    """A problem with the input or the output location, explained for the user."""


class TokenizerTrainingError(DatasetError):
    """SentencePiece could not learn the tokenizer from the text it was given."""


# -----------------------------------------------------------------------------
# Document sources. Each yields (text, UTF-8 bytes) in a fixed order and can be read
# twice: once for tokenizer training, once for encoding.


class DocumentSource(Protocol):
    description: str  # names the input in messages
    input_bytes: int  # for the progress bar

    def documents(self, progress: tqdm) -> Iterator[tuple[str, bytes]]: ...


class JsonlSource:
    def __init__(self, path: Path):
        self.path = path
        self.description = str(path)
        self.input_bytes = _file_size(path)

    def documents(self, progress: tqdm) -> Iterator[tuple[str, bytes]]:
        with _open_input(self.path) as f:
            for line_number, raw in enumerate(f, start=1):
                progress.update(len(raw))
                if not raw.strip():
                    continue
                where = f"{self.path} line {line_number}"
                try:
                    record = json.loads(_decode_utf8(raw, where))
                except json.JSONDecodeError as exc:
                    raise DatasetError(
                        f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DatasetError(
                        f'{where}: expected a JSON object with a string "text" field'
                    )
                text = record["text"]
                yield text, _encode_utf8(text, where)


class DirectorySource:
    def __init__(self, root: Path, files: list[Path]):
        self.files = files
        self.description = str(root)
        self.input_bytes = sum(_file_size(p) for p in files)

    def documents(self, progress: tqdm) -> Iterator[tuple[str, bytes]]:
        for path in self.files:
            with _open_input(path) as f:
                data = f.read()
            progress.update(len(data))
            data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text
            yield _decode_utf8(data, str(path)), data


class ListSource:
    def __init__(self, description: str, texts: list[str]):
        self.texts = texts
        self.description = description
        self.input_bytes = sum(len(text.encode("utf-8")) for text in texts)

    def documents(self, progress: tqdm) -> Iterator[tuple[str, bytes]]:
        for text in self.texts:
            data = text.encode("utf-8")
            progress.update(len(data))
            yield text, data


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (a broken link?)") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None


def _open_input(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (a broken link?)") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{where}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert the text to UTF-8 first"
        ) from None


def _encode_utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(
            f"{where}: the text holds an unpaired surrogate {text[exc.start]!r} at character "
            f"{exc.start}, which has no UTF-8 form; fix the escaping in the source"
        ) from None


def open_docs(path: Path) -> DocumentSource:
    """A JSONL file (one {"text": ...} object a line) or a folder of .txt/.md files."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"--docs {path}: no such file or folder")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in DOC_SUFFIXES and not p.is_dir()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [
            p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise DatasetError(f"--docs {path}: no .txt or .md files in this folder or below it")
        return DirectorySource(path, files)
    return JsonlSource(path)


def capped(docs: Iterable[tuple[str, bytes]], max_docs: int | None, max_bytes: int | None):
    """The documents up to max_docs, stopping after the one that reaches max_bytes."""
    total_bytes = 0
    for index, (text, data) in enumerate(docs):
        if max_docs is not None and index >= max_docs:
            return
        if max_bytes is not None and total_bytes >= max_bytes:
            return
        total_bytes += len(data)
        yield text, data


# -----------------------------------------------------------------------------
# The built-in corpus: docstrings and comments of the installed Python code.

_COMMENT_LINE = re.compile(r"[ \t]*#(.*)")
_CODING_COOKIE = re.compile(r"coding[:=]")
# Tool directives, not prose.
_DIRECTIVE = re.compile(r"\s*(type:|noqa|pragma|fmt:|pylint|mypy:|isort:|flake8|ruff:|nosec|-\*-)")
_HAS_WORD = re.compile(r"[^\W\d_]{2}")


def pydocs_sources() -> list[tuple[str, str, str]]:
    """(label, root, relative path) of every .py file of the standard library and the
    installed packages, and ("pydoc-topics", "", topic) for each pydoc topic, in a fixed
    shuffled order. The shuffle makes any prefix, and so the validation split, a sample
    of the whole installation rather than its alphabetically first modules."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    site_dirs = {Path(paths[key]) for key in ("purelib", "platlib")}
    roots = [("stdlib", stdlib)] + [("site-packages", d) for d in sorted(site_dirs)]
    seen: set[Path] = set()
    sources: list[tuple[str, str, str]] = []
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            # Installed packages are walked as their own root, and only once.
            dirnames[:] = [
                d
                for d in dirnames
                if d != "__pycache__"
                and here / d not in site_dirs
                and d not in ("site-packages", "dist-packages")
            ]
            for filename in filenames:
                file_path = here / filename
                if filename.endswith(".py") and file_path not in seen:
                    seen.add(file_path)
                    sources.append((label, str(root), file_path.relative_to(root).as_posix()))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        topics = {}
    sources += [("pydoc-topics", "", key) for key in topics]
    sources.sort(key=lambda s: (s[0], s[2]))
    random.Random(PYDOCS_SHUFFLE_SEED).shuffle(sources)
    return sources


def extract_units(source: tuple[str, str, str]) -> list[str]:
    """The docstrings and full-line comment blocks of one file, in source order."""
    label, root, relpath = source
    if label == "pydoc-topics":
        from pydoc_data.topics import topics

        return [topics[relpath].strip()]
    path = Path(root, relpath)
    try:
        if path.stat().st_size > PYDOCS_MAX_FILE_BYTES:
            return []
        data = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        source_text = data.decode(encoding)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old code
            tree = ast.parse(source_text)
    except (
        OSError,
        SyntaxError,
        ValueError,
        UnicodeDecodeError,
        LookupError,
        RecursionError,
        MemoryError,
    ):
        return []  # unreadable or not valid Python for this interpreter: not part of the corpus

    # ast counts lines at \n, \r\n and \r only (str.splitlines also breaks at form feeds).
    lines = source_text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    inside_string = bytearray(len(lines) + 2)  # 1 for lines that continue a multi-line string
    units: list[tuple[int, str]] = []
    # A one-line node holds no multi-line string, so the walk skips the inside of one-line
    # nodes (most of the tree); one-line definitions are still visited for their docstrings.
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and docstring.strip():
                units.append((node.body[0].lineno, docstring.strip()))
        for child in ast.iter_child_nodes(node):
            first, last = getattr(child, "lineno", None), getattr(child, "end_lineno", None)
            if first is None or last is None:  # no position (arguments, operators): look inside
                stack.append(child)
            elif isinstance(child, (ast.Constant, ast.JoinedStr)):
                if last > first:
                    inside_string[first + 1 : last + 1] = b"\x01" * (last - first)
            elif last > first or isinstance(
                child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                stack.append(child)

    block: list[str] = []
    block_start = 0
    for line_number, line in enumerate(lines, start=1):
        match = _COMMENT_LINE.fullmatch(line)
        comment = None
        if match and not inside_string[line_number]:
            comment = match.group(1).removeprefix(" ").rstrip()
            is_header = line_number <= 2 and (line.startswith("#!") or _CODING_COOKIE.search(line))
            if is_header or _DIRECTIVE.match(comment) or not _HAS_WORD.search(comment):
                comment = None
        if comment is not None:
            if not block:
                block_start = line_number
            block.append(comment)
        elif block:
            units.append((block_start, "\n".join(block)))
            block = []
    if block:
        units.append((block_start, "\n".join(block)))
    units.sort(key=lambda unit: unit[0])
    return [text for _, text in units]


def collect_pydocs(*, max_bytes: int, workers: int, show_progress: bool) -> tuple[list[str], dict]:
    """One document per source file: its docstrings and comment blocks, each kept only
    at its first occurrence in the corpus (licence headers, vendored copies and stock
    docstrings such as "Return self." would otherwise repeat across both splits)."""
    sources = pydocs_sources()
    seen_units: set[bytes] = set()
    docs: list[str] = []
    total_bytes = 0
    files_read = 0
    duplicate_units = 0
    progress = tqdm(
        total=max_bytes, unit="B", unit_scale=True, desc="extract", disable=not show_progress
    )
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        results = (
            pool.imap(extract_units, sources, chunksize=8) if pool else map(extract_units, sources)
        )
        for units in results:
            files_read += 1
            kept = []
            for unit in units:
                if "\x00" in unit:
                    continue
                try:
                    digest = hashlib.blake2b(unit.encode("utf-8"), digest_size=16).digest()
                except UnicodeEncodeError:  # a lone surrogate from an escape in a docstring
                    continue
                if digest in seen_units:
                    duplicate_units += 1
                    continue
                seen_units.add(digest)
                kept.append(unit)
            if kept:
                doc = "\n\n".join(kept)
                docs.append(doc)
                doc_bytes = len(doc.encode("utf-8"))
                total_bytes += doc_bytes
                progress.update(doc_bytes)
            if total_bytes >= max_bytes:
                break
    finally:
        if pool:
            pool.terminate()
            pool.join()
        progress.close()
    info = {
        "python": sys.version.split()[0],
        "shuffle_seed": PYDOCS_SHUFFLE_SEED,
        "max_bytes": max_bytes,
        "sources_available": len(sources),
        "sources_read": files_read,
        "duplicate_units_dropped": duplicate_units,
    }
    return docs, info


# -----------------------------------------------------------------------------
# The validation split


@dataclass(frozen=True)
class ValSplit:
    docs: int  # the first `docs` documents are the validation split
    reason: str  # why, for the user and the manifest


def default_val_split(doc_sizes: Iterable[int], min_tokens: int) -> ValSplit:
    """The --val-docs default for a corpus whose documents have these UTF-8 sizes, in order.

    At least SMALL_CORPUS_VAL_FRACTION x CHALLENGE_VAL_DOCS documents: the challenge's split,
    the first 50,000 (only that many sizes are read). Fewer: a tenth of them, at least one,
    raised (up to half the corpus) to the first documents that hold min_tokens x
    VAL_BYTES_PER_TOKEN bytes, so that the split holds one validation sequence.
    """
    enough_docs = SMALL_CORPUS_VAL_FRACTION * CHALLENGE_VAL_DOCS
    needed_bytes = min_tokens * VAL_BYTES_PER_TOKEN
    count = total_bytes = 0
    docs_holding_needed_bytes = None
    for size in doc_sizes:
        count += 1
        total_bytes += size
        if docs_holding_needed_bytes is None and total_bytes >= needed_bytes:
            docs_holding_needed_bytes = count
        if count >= enough_docs:
            return ValSplit(
                CHALLENGE_VAL_DOCS,
                f"the challenge's split: the corpus holds at least {enough_docs:,} documents",
            )
    tenth = max(1, count // SMALL_CORPUS_VAL_FRACTION)
    reason = f"a tenth of the corpus' {count:,} documents"
    raised = min(docs_holding_needed_bytes or count, count // 2)
    if raised > tenth:
        return ValSplit(
            raised,
            f"{reason} ({tenth:,}) raised to the first {raised:,}, which hold {needed_bytes:,} "
            f"bytes: room for one {min_tokens}-token sequence",
        )
    return ValSplit(tenth, reason)


# -----------------------------------------------------------------------------
# Tokenizer


def trainer_sentences(text: str) -> Iterator[str]:
    """The text in order, as line-aligned chunks of at most SPM_SENTENCE_BYTES bytes."""
    chunk: list[str] = []
    chunk_bytes = 0
    for line in text.replace("\x00", " ").split("\n"):
        line_bytes = len(line.encode("utf-8"))
        if chunk and chunk_bytes + line_bytes + 1 > SPM_SENTENCE_BYTES:
            yield "\n".join(chunk)
            chunk, chunk_bytes = [], 0
        while line_bytes > SPM_SENTENCE_BYTES:  # rare: minified text; cut at a space where possible
            head = line[: SPM_SENTENCE_BYTES // 4]  # at most 4 bytes a character
            cut = head.rfind(" ")
            cut = cut if cut > len(head) // 2 else len(head)
            yield line[:cut]
            line = line[cut:]
            line_bytes = len(line.encode("utf-8"))
        chunk.append(line)
        chunk_bytes += line_bytes + 1
    if chunk and any(part.strip() for part in chunk):
        yield "\n".join(chunk)


def train_tokenizer(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    source: str,
    user_defined_symbols: tuple[str, ...] = (),
) -> bytes:
    """The serialized SentencePiece model. It is taken from memory rather than written by
    SentencePiece to a model_prefix, which the .model file would record: the bytes then
    depend on the input alone, not on where they were built. `user_defined_symbols` become
    pieces of their own (the CaseOps markers), which text is always cut at.

    The sentences are streamed: SentencePiece keeps its own copy, no list is held here. An
    error raised while reading them (a bad input line) is raised again after training, with
    its message; SentencePiece alone would turn it into a RuntimeError.
    """
    reading_error: list[BaseException] = []

    def guarded() -> Iterator[str]:
        try:
            yield from sentences
        except BaseException as exc:
            reading_error.append(exc)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=SPM_TRAIN_THREADS,
            minloglevel=2,
            **(
                {"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}
            ),
            **SPM_SETTINGS,
        )
    except RuntimeError as exc:
        if reading_error:
            raise reading_error[0] from None
        raise TokenizerTrainingError(
            f"SentencePiece could not train a {vocab_size}-piece tokenizer on the text of "
            f"{source}: {exc}. Give more text or a smaller --vocab-size."
        ) from None
    if reading_error:
        raise reading_error[0]
    learned = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    if learned != vocab_size:
        raise TokenizerTrainingError(
            f"SentencePiece learned only {learned} of {vocab_size} pieces from the training "
            f"documents of {source}; give more text or a smaller --vocab-size"
        )
    return model.getvalue()


def vocab_listing(sp: spm.SentencePieceProcessor) -> str:
    """The .vocab file SentencePiece writes beside a model: one "piece<TAB>score" a line."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        raise DatasetError(f"--tokenizer {path}: no such file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise DatasetError(f"--tokenizer {path}: not a SentencePiece model ({exc})") from None
    if sp.vocab_size() > MAX_VOCAB_SIZE:
        raise DatasetError(
            f"--tokenizer {path}: {sp.vocab_size()} pieces do not fit the uint16 shard format"
        )
    if sp.bos_id() != BOS_ID:
        raise DatasetError(
            f"--tokenizer {path}: bos_id is {sp.bos_id()}; the shard format needs BOS id {BOS_ID}"
        )
    return sp


def caseops_marker_ids(sp: spm.SentencePieceProcessor) -> dict[str, int] | None:
    """The ids of the CaseOps markers when the tokenizer holds each as a piece of its own that
    text containing it is cut at (a CaseOps tokenizer), else None."""
    ids = {}
    for name, marker in caseops.MARKERS.items():
        piece = sp.piece_to_id(marker)
        if piece == sp.unk_id() or sp.encode(f"a{marker}a")[1:2] != [piece]:
            return None
        ids[name] = piece
    return ids


# -----------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class BuildConfig:
    docs: Path | None = None  # None: the built-in Python docs corpus
    name: str | None = None  # default: "pydocs", or the stem of --docs
    vocab_size: int | None = None  # default 1024, or the size of --tokenizer
    tokenizer: Path | None = None  # reuse this SentencePiece model instead of training one
    val_docs: int | None = None  # default: PYDOCS_VAL_DOCS, or default_val_split() for --docs
    min_tokens: int = DEFAULT_MIN_TOKENS  # each split must hold at least this many tokens
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    max_docs: int | None = None
    max_bytes: int | None = None  # default: PYDOCS_MAX_BYTES for the built-in corpus, all of --docs
    # train the tokenizer on the training documents among the first N
    tokenizer_train_docs: int | None = None
    # default: DEFAULT_TOKENIZER_TRAIN_BYTES unless tokenizer_train_docs
    tokenizer_train_bytes: int | None = None
    out_root: Path = DATA_DIR  # holds datasets/ and tokenizers/
    workers: int | None = None  # default: the CPUs this process may use
    force: bool = False  # replace an existing dataset (and tokenizer)
    show_progress: bool = True
    caseops: bool = False  # encode the CaseOps transform of the text, with a byte sidecar


@dataclass
class SplitStats:
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    files: list[dict] = field(default_factory=list)
    # with a byte sidecar: its files, the sum of its counts, the documents that have no token
    sidecar_files: list[dict] = field(default_factory=list)
    sidecar_bytes: int = 0
    docs_without_tokens: int = 0


@dataclass
class BuildResult:
    dataset_dir: Path
    tokenizer_path: Path
    vocab_size: int
    manifest: dict


class SplitWriter:
    """Appends documents to fineweb_<split>_NNNNNN.bin shards of shard_tokens tokens; with
    byte_sidecar, each token's original byte count to fineweb_val_bytes_NNNNNN.bin beside them,
    cut at the same places (one count per token of the shard of the same number)."""

    def __init__(self, dataset_dir: Path, split: str, shard_tokens: int, byte_sidecar: bool):
        self.dataset_dir = dataset_dir
        self.split = split
        self.shard_tokens = shard_tokens
        self.byte_sidecar = byte_sidecar
        self.stats = SplitStats()
        self._writer: ShardWriter | None = None
        self._sidecar: ShardWriter | None = None
        self._sidecar_bytes = 0  # of the open sidecar file

    def append_document(
        self, tokens: np.ndarray, text_bytes: int, byte_counts: np.ndarray | None = None
    ) -> None:
        """`byte_counts`: with a byte sidecar, one uint16 count per token (BOS included)."""
        self.stats.docs += 1
        self.stats.text_bytes += text_bytes
        position = 0
        while position < tokens.size:  # a document may continue in the next shard
            if self._writer is None:
                index = len(self.stats.files)
                self._writer = ShardWriter(self.dataset_dir / shard_name(self.split, index))
                if self.byte_sidecar:
                    self._sidecar = ShardWriter(self.dataset_dir / byte_sidecar_name(index))
            take = min(self.shard_tokens - self._writer.num_tokens, tokens.size - position)
            self._writer.append(tokens[position : position + take])
            if self._sidecar is not None:
                counts = byte_counts[position : position + take]
                self._sidecar.append(counts)
                self._sidecar_bytes += int(counts.sum())
            position += take
            if self._writer.num_tokens == self.shard_tokens:
                self._close_shard()
        self.stats.tokens += int(tokens.size)

    def _close_shard(self) -> None:
        self._writer.close()
        self.stats.files.append({"name": self._writer.path.name, "tokens": self._writer.num_tokens})
        self._writer = None
        if self._sidecar is not None:
            self._sidecar.close()
            self.stats.sidecar_files.append(
                {
                    "name": self._sidecar.path.name,
                    "tokens": self._sidecar.num_tokens,
                    "bytes": self._sidecar_bytes,
                }
            )
            self.stats.sidecar_bytes += self._sidecar_bytes
            self._sidecar, self._sidecar_bytes = None, 0

    def finish(self) -> SplitStats:
        if self._writer is not None:
            self._close_shard()
        return self.stats

    def abort(self) -> None:
        for writer in (self._writer, self._sidecar):
            if writer is not None:
                writer.abort()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def build(config: BuildConfig) -> BuildResult:
    """Builds the dataset described by config; raises DatasetError with a message for the user."""
    workers = config.workers or default_workers()
    builtin = config.docs is None
    name = config.name or (PYDOCS_NAME if builtin else Path(config.docs).stem)
    if not NAME_PATTERN.fullmatch(name):
        raise DatasetError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or "
            "digit"
        )
    for flag, value in [
        ("--val-docs", config.val_docs),
        ("--min-tokens", config.min_tokens),
        ("--shard-tokens", config.shard_tokens),
        ("--tokenizer-train-docs", config.tokenizer_train_docs),
        ("--tokenizer-train-bytes", config.tokenizer_train_bytes),
        ("--max-docs", config.max_docs),
        ("--max-bytes", config.max_bytes),
    ]:
        if value is not None and value < 1:
            raise DatasetError(f"{flag} must be at least 1, got {value}")
    tokenizer_train_bytes = config.tokenizer_train_bytes
    if tokenizer_train_bytes is None and config.tokenizer_train_docs is None:
        tokenizer_train_bytes = DEFAULT_TOKENIZER_TRAIN_BYTES
    if config.shard_tokens >= 1 << 31:
        raise DatasetError(
            "--shard-tokens must be below 2**31 (the header stores an int32), got "
            f"{config.shard_tokens}"
        )

    sp = None
    if config.tokenizer is not None:
        if config.tokenizer_train_docs is not None or config.tokenizer_train_bytes is not None:
            raise DatasetError(
                "--tokenizer-train-docs and --tokenizer-train-bytes train a tokenizer; "
                "--tokenizer reuses one: give one or the other"
            )
        sp = load_tokenizer(Path(config.tokenizer))
        vocab_size = sp.vocab_size()
        if config.vocab_size is not None and config.vocab_size != vocab_size:
            raise DatasetError(
                f"--vocab-size {config.vocab_size} does not match --tokenizer {config.tokenizer} "
                f"({vocab_size} pieces)"
            )
        is_caseops_tokenizer = caseops_marker_ids(sp) is not None
        if config.caseops and not is_caseops_tokenizer:
            raise DatasetError(
                f"--tokenizer {config.tokenizer} does not hold the CaseOps markers (U+E001 to "
                "U+E004) as pieces of their own; give a CaseOps tokenizer, or leave --tokenizer "
                "out to train one"
            )
        if is_caseops_tokenizer and not config.caseops:
            raise DatasetError(
                f"--tokenizer {config.tokenizer} is a CaseOps tokenizer (it holds the markers "
                "U+E001 to U+E004 as pieces); pass --caseops to encode the CaseOps text with it"
            )
    else:
        vocab_size = config.vocab_size or DEFAULT_VOCAB_SIZE
        reserved = 4 + (len(CASEOPS_USER_SYMBOLS) if config.caseops else 0)
        if not 256 + reserved < vocab_size <= MAX_VOCAB_SIZE:
            what = "special" if reserved == 4 else "special and marker"
            raise DatasetError(
                f"--vocab-size {vocab_size}: must exceed {256 + reserved} ({reserved} {what} and "
                f"256 byte pieces) and be at most {MAX_VOCAB_SIZE}"
            )

    out_root = Path(config.out_root).resolve()
    datasets_dir = out_root / "datasets"
    tokenizers_dir = out_root / "tokenizers"
    # A CaseOps build of a corpus sits beside the plain one.
    stem = f"{name}_caseops" if config.caseops else name
    dataset_dir = datasets_dir / f"{stem}_sp{vocab_size}"
    if sp is None:
        tokenizer_path = tokenizers_dir / f"{stem}_{vocab_size}_bpe.model"
    else:
        tokenizer_path = Path(config.tokenizer).resolve()
    existing = [dataset_dir] + ([tokenizer_path] if sp is None else [])
    for path in existing:
        if path.exists() and not config.force:
            raise DatasetError(f"{display_path(path)} already exists; pass --force to replace it")

    if builtin:
        max_bytes = config.max_bytes or PYDOCS_MAX_BYTES
        texts, source_info = collect_pydocs(
            max_bytes=max_bytes, workers=workers, show_progress=config.show_progress
        )
        source_info = {"kind": "pydocs", **source_info, "max_docs": config.max_docs}
        source: DocumentSource = ListSource("the built-in Python docs corpus", texts)
        max_docs, max_bytes = config.max_docs, None  # the byte cap was applied while collecting
    else:
        source = open_docs(Path(config.docs))
        max_docs, max_bytes = config.max_docs, config.max_bytes
        source_info = {
            "kind": "dir" if isinstance(source, DirectorySource) else "jsonl",
            "path": str(config.docs),
            "max_docs": max_docs,
            "max_bytes": max_bytes,
        }

    def documents(desc: str, total: int) -> Iterator[tuple[str, bytes]]:
        progress = tqdm(
            total=total, unit="B", unit_scale=True, desc=desc, disable=not config.show_progress
        )
        try:
            yield from capped(source.documents(progress), max_docs, max_bytes)
        finally:
            progress.close()

    if config.val_docs is not None:
        split = ValSplit(config.val_docs, "--val-docs")
    elif builtin:
        split = ValSplit(PYDOCS_VAL_DOCS, "the built-in corpus' default")
    else:  # a first pass over (at most 500,000 of) the documents counts them
        counted = documents("count", source.input_bytes)
        try:
            split = default_val_split((len(data) for _, data in counted), config.min_tokens)
        finally:
            counted.close()
        print(
            f"val_docs: {split.docs:,} ({split.reason}; --val-docs sets another)", file=sys.stderr
        )
    val_docs = split.docs
    if (
        config.tokenizer_train_docs is not None
        and sp is None
        and config.tokenizer_train_docs <= val_docs
    ):
        raise DatasetError(
            f"--tokenizer-train-docs {config.tokenizer_train_docs}: the tokenizer trains on the "
            f"training documents among the first N, and the first {val_docs:,} are the validation "
            f"split; give more than {val_docs:,}"
        )

    datasets_dir.mkdir(parents=True, exist_ok=True)
    tokenizers_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(
        tempfile.mkdtemp(dir=datasets_dir, prefix=f".{dataset_dir.name}.", suffix=".tmp")
    )
    set_default_permissions(work_dir, is_dir=True)
    tokenizer_work_dir = Path(
        tempfile.mkdtemp(dir=tokenizers_dir, prefix=f".{stem}_{vocab_size}.", suffix=".tmp")
    )
    try:
        tokenizer_info: dict = {}
        if sp is None:
            text = TokenizerText(
                val_docs=val_docs,
                max_docs=config.tokenizer_train_docs,
                max_bytes=tokenizer_train_bytes,
                encode_caseops=config.caseops,
            )
            user_symbols = CASEOPS_USER_SYMBOLS if config.caseops else ()
            try:
                model_bytes = train_tokenizer(
                    text.sentences(documents("tokenizer text", source.input_bytes)),
                    vocab_size=vocab_size,
                    source=source.description,
                    user_defined_symbols=user_symbols,
                )
            except TokenizerTrainingError:
                text.check(source.description)  # a plainer reason when there is one
                raise
            text.check(source.description)
            sp = spm.SentencePieceProcessor(model_proto=model_bytes)
            (tokenizer_work_dir / tokenizer_path.name).write_bytes(model_bytes)
            (tokenizer_work_dir / tokenizer_path.with_suffix(".vocab").name).write_text(
                vocab_listing(sp), encoding="utf-8"
            )
            tokenizer_info = {
                "trained_on_docs": text.docs,
                "trained_on_bytes": text.bytes,
                "trained_on_doc_numbers": [val_docs + 1, val_docs + text.docs],
                "tokenizer_train_docs": config.tokenizer_train_docs,
                "tokenizer_train_bytes": tokenizer_train_bytes,
                "settings": (
                    {**SPM_SETTINGS, "user_defined_symbols": list(user_symbols)}
                    if user_symbols
                    else SPM_SETTINGS
                ),
            }

        split_stats, docs_sha256 = _write_shards(
            documents("encode", source.input_bytes),
            sp=sp,
            dataset_dir=work_dir,
            val_docs=val_docs,
            config=config,
            workers=workers,
            source=source.description,
        )
        model_file = tokenizer_work_dir / tokenizer_path.name if tokenizer_info else tokenizer_path
        manifest = _manifest(
            marker_ids=caseops_marker_ids(sp) if config.caseops else None,
            name=dataset_dir.name,
            vocab_size=vocab_size,
            shard_tokens=config.shard_tokens,
            source_info=source_info,
            tokenizer={
                "path": _manifest_path(tokenizer_path, out_root),
                "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
                "trained_here": bool(tokenizer_info),
                **tokenizer_info,
            },
            docs_sha256=docs_sha256,
            split=split,
            val=split_stats["val"],
            train=split_stats["train"],
        )
        write_text_atomic(work_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")

        if tokenizer_info:
            for suffix in (".model", ".vocab"):
                os.replace(
                    tokenizer_work_dir / f"{tokenizer_path.stem}{suffix}",
                    tokenizer_path.with_suffix(suffix),
                )
        _publish_dir(work_dir, dataset_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(tokenizer_work_dir, ignore_errors=True)
    return BuildResult(
        dataset_dir=dataset_dir,
        tokenizer_path=tokenizer_path,
        vocab_size=vocab_size,
        manifest=manifest,
    )


class TokenizerText:
    """The tokenizer's training text: the training documents (those after the first val_docs)
    among the first max_docs, up to max_bytes of them (counted in original bytes), as trainer
    sentences, in their CaseOps form with encode_caseops. Counts what it read."""

    def __init__(
        self, *, val_docs: int, max_docs: int | None, max_bytes: int | None, encode_caseops: bool
    ):
        self.val_docs, self.max_docs, self.max_bytes = val_docs, max_docs, max_bytes
        self.encode_caseops = encode_caseops
        self.docs_read = 0  # validation documents included
        self.docs = self.bytes = self.sentence_count = 0  # what the tokenizer learned from

    def sentences(self, docs: Iterator[tuple[str, bytes]]) -> Iterator[str]:
        try:
            for text, data in docs:
                if self.max_docs is not None and self.docs_read >= self.max_docs:
                    return
                self.docs_read += 1
                if self.docs_read <= self.val_docs:
                    continue
                if self.encode_caseops:
                    text = caseops.encode(text)
                for sentence in trainer_sentences(text):
                    self.sentence_count += 1
                    yield sentence
                self.docs += 1
                self.bytes += len(data)
                if self.max_bytes is not None and self.bytes >= self.max_bytes:
                    return
        finally:
            docs.close()

    def check(self, source: str) -> None:
        _check_doc_count(self.docs_read, self.val_docs, source)
        if self.sentence_count == 0:
            raise DatasetError(
                f"{source}: the training documents (all after the first {self.val_docs}) hold no "
                "text"
            )


def _check_doc_count(total_docs: int, val_docs: int, source: str) -> None:
    if total_docs == 0:
        raise DatasetError(f"{source} holds no documents")
    if total_docs <= val_docs:
        raise DatasetError(
            f"{source} holds {total_docs} documents, and the validation split (the first "
            f"{val_docs}) takes all of them; lower --val-docs or give more documents"
        )


def _write_shards(
    docs: Iterator[tuple[str, bytes]],
    *,
    sp: spm.SentencePieceProcessor,
    dataset_dir: Path,
    val_docs: int,
    config: BuildConfig,
    workers: int,
    source: str,
) -> tuple[dict[str, SplitStats], str]:
    writers = {
        split: SplitWriter(
            dataset_dir, split, config.shard_tokens, byte_sidecar=config.caseops and split == "val"
        )
        for split in ("val", "train")
    }
    stats: dict[str, SplitStats] = {}
    hasher = hashlib.sha256()
    batch: list[tuple[str, int]] = []
    batch_bytes = 0
    doc_index = 0

    def check_size(split: str, split_stats: SplitStats) -> None:
        what = (
            f"first {val_docs} documents"
            if split == "val"
            else f"documents after the first {val_docs}"
        )
        if split_stats.tokens < config.min_tokens:
            raise DatasetError(
                f"{source}: the {split} split ({what}) has {split_stats.tokens} tokens, fewer than "
                f"--min-tokens {config.min_tokens} (one training sequence plus its target); "
                "give more text"
                + (" or raise --val-docs" if split == "val" else " or lower --val-docs")
            )

    def flush(split: str) -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        texts = [text for text, _ in batch]
        if writers[split].byte_sidecar:
            encoded = caseops.encode_with_byte_counts(sp, texts, num_threads=workers)
        else:
            encoded = [(ids, None) for ids in sp.encode(texts, out_type=int, num_threads=workers)]
        first_doc = doc_index - len(batch) + 1
        for number, (ids, counts), (_, text_bytes) in zip(
            range(first_doc, doc_index + 1), encoded, batch, strict=True
        ):
            tokens = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
            tokens[0] = BOS_ID
            tokens[1:] = ids
            byte_counts = None
            if counts is not None:
                byte_counts = sidecar_counts(counts, text_bytes, number)
                writers[split].stats.docs_without_tokens += not ids
            writers[split].append_document(tokens, text_bytes, byte_counts)
        batch, batch_bytes = [], 0

    def sidecar_counts(counts: np.ndarray, text_bytes: int, number: int) -> np.ndarray:
        """[0 for BOS] + the tokens' original bytes, checked against the document's length."""
        if counts.size and int(counts.sum()) != text_bytes:  # caseops.token_byte_counts failed
            raise AssertionError(
                f"{source} document {number}: its tokens' byte counts add up to "
                f"{int(counts.sum())}, not its {text_bytes} UTF-8 bytes"
            )
        if counts.size and int(counts.max()) > MAX_TOKEN_BYTES:
            raise DatasetError(
                f"{source} document {number}: one token stands for {int(counts.max()):,} bytes "
                f"(a run of whitespace the tokenizer drops?), more than the byte sidecar's uint16 "
                "holds; shorten that whitespace"
            )
        return np.concatenate([[0], counts]).astype(TOKEN_DTYPE)

    try:
        for text, data in docs:
            doc_index += 1
            hasher.update(len(data).to_bytes(8, "little"))
            hasher.update(data)
            split = "val" if doc_index <= val_docs else "train"
            batch.append((caseops.encode(text) if config.caseops else text, len(data)))
            batch_bytes += len(data)
            if doc_index == val_docs:
                flush("val")
                stats["val"] = writers["val"].finish()
                check_size("val", stats["val"])
            elif len(batch) >= ENCODE_BATCH_DOCS or batch_bytes >= ENCODE_BATCH_BYTES:
                flush(split)
        flush("train" if doc_index > val_docs else "val")
        _check_doc_count(doc_index, val_docs, source)
        stats["train"] = writers["train"].finish()
        total_bytes = stats["val"].text_bytes + stats["train"].text_bytes
        if total_bytes == 0:
            raise DatasetError(f"{source}: all {doc_index} documents are empty")
        check_size("train", stats["train"])
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return stats, hasher.hexdigest()


def _manifest(
    *,
    marker_ids: dict[str, int] | None,
    name: str,
    vocab_size: int,
    shard_tokens: int,
    source_info: dict,
    tokenizer: dict,
    docs_sha256: str,
    split: ValSplit,
    val: SplitStats,
    train: SplitStats,
) -> dict:
    transform = {}
    if marker_ids is not None:
        transform = {
            "text_transform": "caseops",
            "caseops": {
                "scheme": caseops.SCHEME,
                "markers": {what: f"U+{ord(c):04X}" for what, c in caseops.MARKERS.items()},
                "marker_ids": marker_ids,
                "byte_sidecar": {
                    "files": val.sidecar_files,
                    "count_dtype": "<u2",
                    "bytes_total": val.sidecar_bytes,
                    "counts": CASEOPS_SIDECAR_RULE,
                },
                "val_docs_without_tokens": val.docs_without_tokens,
            },
        }
    return {
        "name": name,
        "format": {
            "header_int32": HEADER_INT32,
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "token_dtype": "<u2",
        },
        "bos_id": BOS_ID,
        "append_eos": False,
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        "source": source_info,
        "tokenizer": tokenizer,
        "docs_sha256": docs_sha256,
        "docs_sha256_scheme": DOCS_SHA256_SCHEME,
        "val_docs": {"count": split.docs, "from": split.reason},
        "stats": {
            "docs_total": val.docs + train.docs,
            "docs_val": val.docs,
            "docs_train": train.docs,
            "tokens_total": val.tokens + train.tokens,
            "tokens_val": val.tokens,
            "tokens_train": train.tokens,
            "bytes_total": val.text_bytes + train.text_bytes,
            "bytes_val": val.text_bytes,
            "bytes_train": train.text_bytes,
            "files_val": len(val.files),
            "files_train": len(train.files),
        },
        "files": val.files + train.files,
        **transform,
    }


def _manifest_path(path: Path, out_root: Path) -> str:
    try:
        return path.relative_to(out_root).as_posix()
    except ValueError:
        return str(path)


def _publish_dir(work_dir: Path, dataset_dir: Path) -> None:
    """Moves the finished dataset into place; an old one (--force) is removed only after."""
    old = None
    if dataset_dir.exists():
        old = dataset_dir.with_name(f".{dataset_dir.name}.old-{os.getpid()}")
        os.rename(dataset_dir, old)
    os.rename(work_dir, dataset_dir)
    if old is not None:
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if re.fullmatch(r"\d+(\.\d+)?[eE]\d+", text) else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build a challenge-format dataset (SentencePiece BPE tokenizer + uint16 token "
        "shards) from local text. With no --docs: the docstrings and comments of this Python "
        "installation."
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help='a .jsonl file (one {"text": ...} object a line, e.g. the challenge\'s '
        "docs_selected.jsonl) or a folder of .txt/.md files (one document each, in path order)",
    )
    parser.add_argument(
        "--name", help=f"dataset name (default: {PYDOCS_NAME}, or the stem of --docs)"
    )
    parser.add_argument(
        "--vocab-size",
        type=_positive_int,
        help=f"tokenizer size (default: {DEFAULT_VOCAB_SIZE}, or that of --tokenizer)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="encode with this SentencePiece .model instead of training one",
    )
    parser.add_argument(
        "--val-docs",
        type=_positive_int,
        help=f"the first N documents form the validation split (default: {PYDOCS_VAL_DOCS} for the "
        f"built-in corpus; for --docs, the challenge's {CHALLENGE_VAL_DOCS:_} when it holds at "
        f"least {SMALL_CORPUS_VAL_FRACTION * CHALLENGE_VAL_DOCS:_} documents, else a tenth of "
        "them, raised if needed to hold one --min-tokens sequence)",
    )
    parser.add_argument(
        "--min-tokens",
        type=_positive_int,
        default=DEFAULT_MIN_TOKENS,
        help=f"fail unless each split holds this many tokens (default: {DEFAULT_MIN_TOKENS} = "
        "TRAIN_SEQ_LEN 1024 + 1)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=_positive_int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:_})",
    )
    parser.add_argument("--max-docs", type=_positive_int, help="use only the first N documents")
    parser.add_argument(
        "--max-bytes",
        type=_positive_int,
        help=f"stop after this many bytes of document text (default: {PYDOCS_MAX_BYTES:_} for the "
        "built-in corpus, no limit for --docs)",
    )
    parser.add_argument(
        "--tokenizer-train-docs",
        type=_positive_int,
        help="train the tokenizer on the training documents among the first N documents (the "
        "SP4096/SP8192 records used 5000000; the validation documents among them are left out)",
    )
    parser.add_argument(
        "--tokenizer-train-bytes",
        type=_positive_int,
        help=f"train the tokenizer on at most this many bytes of training-split text "
        f"(default: {DEFAULT_TOKENIZER_TRAIN_BYTES:_}, or no limit with --tokenizer-train-docs)",
    )
    parser.add_argument(
        "--out-root",
        type=Path,
        default=DATA_DIR,
        help="write datasets/ and tokenizers/ under this folder (default: the folder of this "
        "script)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="processes/threads for extraction and encoding (default: all usable CPUs)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing dataset and tokenizer of the same name",
    )
    parser.add_argument(
        "--caseops",
        action="store_true",
        help="encode the CaseOps form of the text (capitals as marker tokens + lower case, "
        "see caseops.py) with a tokenizer holding the markers, and write the validation "
        "tokens' original byte counts beside the shards (fineweb_val_bytes_NNNNNN.bin); the "
        'names get "_caseops"',
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they show only on a terminal)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = BuildConfig(
        docs=args.docs,
        name=args.name,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        val_docs=args.val_docs,
        min_tokens=args.min_tokens,
        shard_tokens=args.shard_tokens,
        max_docs=args.max_docs,
        max_bytes=args.max_bytes,
        tokenizer_train_docs=args.tokenizer_train_docs,
        tokenizer_train_bytes=args.tokenizer_train_bytes,
        out_root=args.out_root,
        workers=args.workers,
        force=args.force,
        show_progress=not args.no_progress and sys.stderr.isatty(),
        caseops=args.caseops,
    )
    try:
        result = build(config)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats = result.manifest["stats"]
    if "caseops" in result.manifest:
        sidecar = result.manifest["caseops"]["byte_sidecar"]
        print(
            f"text_transform: caseops, byte sidecar {sidecar['files'][0]['name']} ... "
            f"({len(sidecar['files'])} files, {sidecar['bytes_total']:,} bytes)"
        )
    print(
        f"dataset: {display_path(result.dataset_dir)}\n"
        f"tokenizer: {display_path(result.tokenizer_path)}\n"
        f"docs: val {stats['docs_val']:,} train {stats['docs_train']:,}\n"
        f"tokens: val {stats['tokens_val']:,} train {stats['tokens_train']:,}\n"
        f"bytes_per_token: {stats['bytes_total'] / stats['tokens_total']:.3f}\n"
        f"train with: DATA_PATH={display_path(result.dataset_dir)} "
        f"TOKENIZER_PATH={display_path(result.tokenizer_path)} VOCAB_SIZE={result.vocab_size}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
