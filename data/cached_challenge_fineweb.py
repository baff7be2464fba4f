"""Download published FineWeb shards and tokenizers (sp1024, sp4096, sp8192) from Hugging Face.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 128

Each variant is read from the dataset repo that publishes it (KNOWN_SOURCES: sp1024 from the
challenge's repo, sp4096 and sp8192 from the repo the SP4096/SP8192 records used), unless
--repo-id / MATCHED_FINEWEB_REPO_ID names another. The export's manifest.json says how many
shards a variant has and which tokenizer files belong to it; a variant that the manifest does
not list (or a repo without one) is found from the repo's file listing instead. Files land in
    datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    datasets/fineweb10B_<variant>/manifest.json      (the source and the tokenizer's sha256)
    datasets/manifests/<repo>/<root>/manifest.json   (the export's manifest, if it has one)
    tokenizers/<the variant's tokenizer files>
under --out-root (default: this folder). Runs resume: complete files are kept, and a
shard whose header or size is wrong (a partial or damaged file) is fetched again. Files
appear under their final names only once complete and checked. The dataset folder's
manifest.json is written last, in the fields data/build_dataset.py uses: train_gpt.py
refuses a TOKENIZER_PATH that is not the tokenizer it names.

--mirror DIR reads a local copy of the hub (DIR/<owner>/<name>/, same layout as each repo)
instead of Hugging Face.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import sentencepiece as spm
from tqdm import tqdm

from shard_format import (
    HEADER_INT32,
    SHARD_MAGIC,
    SHARD_VERSION,
    TOKEN_DTYPE,
    ShardError,
    display_path,
    read_header,
    shard_name,
    temp_file_beside,
    write_text_atomic,
)

DATA_DIR = Path(__file__).resolve().parent
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_VARIANT = "sp1024"
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens: more than a 10-minute run reads
DATASET_PREFIX = "fineweb10B_"  # the export names a variant's folder fineweb10B_<variant>
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
STAGING_DIR_NAME = ".download"  # partial downloads, kept between runs so they can resume
MANIFESTS_DIR_NAME = "manifests"  # one cached manifest per repo and root
# Beside the shards, as build_dataset.py writes it: train_gpt.py checks the tokenizer against it.
DATASET_MANIFEST = "manifest.json"
DOWNLOADED = "download"  # its source.kind; build_dataset.py's are pydocs, jsonl and dir
# train_gpt.py counts bytes from SentencePiece pieces, which is right for these exports only.
SCOREABLE_VARIANT = re.compile(r"sp\d+")
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SHARD_FILE = re.compile(r"fineweb_(val|train)_(\d{6})\.bin")
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a folder name, never a path


@dataclass(frozen=True)
class KnownSource:
    repo_id: str
    remote_root: str
    variants: tuple[str, ...]


# Where each published variant lives (data/README.md says what each repo holds).
KNOWN_SOURCES = (
    # the challenge's export
    KnownSource("willdepueoai/parameter-golf", DEFAULT_REMOTE_ROOT, ("sp1024",)),
    # the SP4096/SP8192 records'
    KnownSource("kevclark/parameter-golf", DEFAULT_REMOTE_ROOT, ("sp4096", "sp8192")),
)
DEFAULT_REPO_ID = KNOWN_SOURCES[0].repo_id


class DownloadError(Exception):
    """A download that cannot go on, explained for the user."""


def known_variants_text() -> str:
    return "; ".join(f"{', '.join(s.variants)} in {s.repo_id}" for s in KNOWN_SOURCES)


def resolve_source(variant: str, repo_id: str | None, remote_root: str | None) -> tuple[str, str]:
    """(repo, root folder) for `variant`: the ones given, else the variant's known source."""
    known = next((s for s in KNOWN_SOURCES if variant in s.variants), KNOWN_SOURCES[0])
    repo_id = repo_id or known.repo_id
    remote_root = known.remote_root if remote_root is None else remote_root.strip("/")
    if not REPO_ID_PATTERN.fullmatch(repo_id):
        raise DownloadError(
            f"repo id {repo_id!r} is not of the form owner/name; check {REPO_ENV} or --repo-id"
        )
    if remote_root and any(part in ("", ".", "..") for part in remote_root.split("/")):
        raise DownloadError(
            f"remote root {remote_root!r} is not a plain folder path; check {REMOTE_ROOT_ENV} or "
            "--remote-root"
        )
    return repo_id, remote_root


# -----------------------------------------------------------------------------
# Fetchers: the one place that reads from the remote side. fetch() writes the file at
# remote_path (relative to the repo root) to destination; list_files() names every file
# of the repo.


class Fetcher(Protocol):
    description: str

    def fetch(self, remote_path: str, destination: Path) -> None: ...

    def list_files(self) -> list[str]: ...


class RemoteFileMissing(DownloadError):
    """The repo exists but holds no file at that path."""


class HubFetcher:
    def __init__(self, repo_id: str, staging_dir: Path):
        self.repo_id = repo_id
        self.staging_dir = staging_dir
        self.description = f"Hugging Face dataset repo {repo_id}"

    def _call(self, what: str, action):
        from huggingface_hub import errors as hf_errors

        try:
            return action()
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            reason = (
                "offline mode is on (HF_HUB_OFFLINE); unset it to download"
                if offline
                else "huggingface.co cannot be reached; check the network connection"
            )
            raise DownloadError(
                f"cannot {what} from {self.description}: {reason}, or pass --mirror DIR to read a "
                "local copy"
            ) from None
        except hf_errors.GatedRepoError:
            raise DownloadError(
                f"{self.description} is gated: accept its terms on huggingface.co and log in "
                "(hf auth login)"
            ) from None
        except hf_errors.RepositoryNotFoundError:
            raise DownloadError(
                f"{self.description} does not exist or is private; check {REPO_ENV} or --repo-id"
            ) from None
        except hf_errors.RemoteEntryNotFoundError:
            raise RemoteFileMissing(
                f"cannot {what}: no such file in {self.description}; check {REMOTE_ROOT_ENV} or "
                "--remote-root"
            ) from None
        # the network boundary: any other failure ends the run with one message
        except Exception as exc:
            raise DownloadError(f"cannot {what} from {self.description}: {exc}") from None

    def fetch(self, remote_path: str, destination: Path) -> None:
        from huggingface_hub import hf_hub_download

        remote = PurePosixPath(remote_path)
        # local_dir (not the shared cache) keeps one copy of each shard on disk, and
        # keeps interrupted transfers there for the next run to resume.
        downloaded = self._call(
            f"download {remote_path}",
            lambda: hf_hub_download(
                repo_id=self.repo_id,
                filename=remote.name,
                subfolder=str(remote.parent) if str(remote.parent) != "." else None,
                repo_type="dataset",
                local_dir=self.staging_dir,
            ),
        )
        os.replace(downloaded, destination)

    def list_files(self) -> list[str]:
        from huggingface_hub import HfApi

        return self._call(
            "list the files", lambda: HfApi().list_repo_files(self.repo_id, repo_type="dataset")
        )


class MirrorFetcher:
    """A local copy of the hub (say on a shared disk): a folder per repo, MIRROR/<owner>/<name>/."""

    def __init__(self, mirror_dir: Path, repo_id: str):
        self.repo_dir = Path(mirror_dir) / repo_id
        self.description = f"mirror {self.repo_dir}"
        if not self.repo_dir.is_dir():
            held = sorted(
                f"{owner.name}/{repo.name}"
                for owner in Path(mirror_dir).iterdir()
                if owner.is_dir()
                for repo in owner.iterdir()
                if repo.is_dir()
            )
            raise DownloadError(
                f"--mirror {mirror_dir} has no copy of {repo_id} (no folder {self.repo_dir}); it "
                f"holds: {', '.join(held) or 'no repos'} (a mirror holds one folder per repo, "
                "DIR/<owner>/<name>/)"
            )

    def fetch(self, remote_path: str, destination: Path) -> None:
        source = self.repo_dir / remote_path
        if not source.is_file():
            raise RemoteFileMissing(
                f"{remote_path} is not in the {self.description} (no file {source})"
            )
        shutil.copyfile(source, destination)

    def list_files(self) -> list[str]:
        return sorted(
            p.relative_to(self.repo_dir).as_posix() for p in self.repo_dir.rglob("*") if p.is_file()
        )


# -----------------------------------------------------------------------------
# What to fetch: from the export's manifest, or from the repo's file listing


@dataclass(frozen=True)
class PlannedFile:
    remote_path: str
    local_path: Path
    expected_tokens: int | None = None  # for shards, when the manifest implies it


@dataclass(frozen=True)
class VariantFiles:
    """One variant's files in the repo, paths relative to the export's root folder."""

    dataset_name: str  # fineweb10B_<variant>
    files_val: int
    files_train: int
    tokenizer_files: tuple[str, ...]  # the SentencePiece .model first
    found_in: str  # "manifest" or "file listing"
    # the export's manifest and the variant's entry in it, when listed there
    manifest: dict | None = None
    entry: dict | None = None

    def expected_tokens(self, split: str, index: int) -> int | None:
        """Every shard but a split's last holds shard_size tokens; the last holds the rest."""
        try:
            shard_size = int(self.manifest["shard_size"])
            stats = self.entry["stats"]
            files, tokens = int(stats[f"files_{split}"]), int(stats[f"tokens_{split}"])
        except (KeyError, TypeError, ValueError):
            return None
        expected = shard_size if index < files - 1 else tokens - (files - 1) * shard_size
        return expected if 0 < expected <= shard_size else None


def remote_join(remote_root: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (remote_root, *parts) if p.strip("/"))


def variant_of(dataset_name: str) -> str:
    return dataset_name.split("_", 1)[-1]


def manifest_variants(manifest: dict | None) -> list[str]:
    entries = (manifest or {}).get("datasets") or []
    return sorted(
        variant_of(str(e["name"])) for e in entries if isinstance(e, dict) and "name" in e
    )


def from_manifest(manifest: dict | None, variant: str) -> VariantFiles | None:
    """The variant as the manifest describes it, or None when the manifest does not list it."""
    entries = [
        e for e in (manifest or {}).get("datasets") or [] if isinstance(e, dict) and "name" in e
    ]
    entry = next(
        (e for e in entries if e["name"] == variant or variant_of(str(e["name"])) == variant), None
    )
    if entry is None:
        return None
    if not DATASET_NAME.fullmatch(str(entry["name"])):
        raise DownloadError(f"the manifest names an unsafe dataset folder {entry['name']!r}")
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(
            f"the manifest entry for {entry['name']} lacks stats.files_val / stats.files_train"
        ) from None
    tokenizer_name = entry.get("tokenizer_name")
    tokenizers = [t for t in manifest.get("tokenizers") or [] if isinstance(t, dict)]
    tokenizer = next((t for t in tokenizers if t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(
            f"the manifest lists no tokenizer {tokenizer_name!r} for {entry['name']}"
        )
    artifacts = tuple(
        str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)
    )
    if not artifacts or not artifacts[0].endswith(".model"):
        raise DownloadError(
            f"the manifest's tokenizer {tokenizer_name!r} for {entry['name']} names no "
            "SentencePiece .model file"
        )
    return VariantFiles(
        str(entry["name"]), files_val, files_train, artifacts, "manifest", manifest, entry
    )


def listed_variants(files: list[str], remote_root: str) -> list[str]:
    """Variants whose validation shards are in the listing."""
    prefix = remote_join(remote_root, "datasets") + "/"
    found = set()
    for path in files:
        parts = path[len(prefix) :].split("/") if path.startswith(prefix) else []
        if (
            len(parts) == 2
            and parts[0].startswith(DATASET_PREFIX)
            and parts[1].startswith("fineweb_val_")
        ):
            found.add(variant_of(parts[0]))
    return sorted(found)


def from_listing(files: list[str], remote_root: str, variant: str) -> VariantFiles | None:
    """The variant from the repo's file names, laid out as the challenge's export lays them out:
    datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin and
    tokenizers/fineweb_<V>_bpe.model."""
    dataset_name = DATASET_PREFIX + variant
    folder = remote_join(remote_root, "datasets", dataset_name) + "/"
    indices: dict[str, list[int]] = {"val": [], "train": []}
    for path in files:
        match = SHARD_FILE.fullmatch(path[len(folder) :]) if path.startswith(folder) else None
        if match:
            indices[match[1]].append(int(match[2]))
    if not indices["val"]:
        return None
    for split, found in indices.items():
        if sorted(found) != list(range(len(found))):
            gaps = sorted(set(range(max(found) + 1)) - set(found))
            raise DownloadError(
                f"{folder} lists {len(found)} {split} shards but not {shard_name(split, gaps[0])}: "
                "the repo's copy is incomplete"
            )
    vocab = variant.removeprefix("sp")
    model = remote_join(remote_root, "tokenizers", f"fineweb_{vocab}_bpe.model")
    if model not in files:
        models = [
            p
            for p in files
            if p.startswith(remote_join(remote_root, "tokenizers") + "/") and p.endswith(".model")
        ]
        raise DownloadError(
            f"{folder} has no tokenizer {model} beside it (the repo's tokenizers: "
            f"{', '.join(models) or 'none'})"
        )
    vocab_file = model.removesuffix(".model") + ".vocab"
    artifacts = (model, vocab_file) if vocab_file in files else (model,)
    root_relative = tuple(
        path[len(remote_root) + 1 :] if remote_root else path for path in artifacts
    )
    return VariantFiles(
        dataset_name, len(indices["val"]), len(indices["train"]), root_relative, "file listing"
    )


def tokenizer_local_path(artifact: str, tokenizers_dir: Path) -> Path:
    parts = PurePosixPath(artifact).parts
    if not parts or PurePosixPath(artifact).is_absolute() or ".." in parts:
        raise DownloadError(f"the manifest names an unsafe tokenizer path {artifact!r}")
    if parts[0] == "tokenizers":
        parts = parts[1:]
    return tokenizers_dir.joinpath(*parts)


def plan_downloads(
    found: VariantFiles, config: DownloadConfig, remote_root: str
) -> tuple[list[PlannedFile], Path, Path]:
    """The files to fetch, the dataset folder and the tokenizer model path."""
    out_root = Path(config.out_root)
    if config.train_shards > found.files_train:
        raise DownloadError(
            f"{config.variant} has {found.files_train} training shards, --train-shards asks for "
            f"{config.train_shards}"
        )
    dataset_dir = out_root / "datasets" / found.dataset_name
    remote_dataset = remote_join(remote_root, "datasets", found.dataset_name)
    planned: list[PlannedFile] = []
    if config.with_docs:
        planned += [
            PlannedFile(remote_join(remote_root, name), out_root / "datasets" / name)
            for name in DOCS_FILES
        ]
    for split, count in (("val", found.files_val), ("train", config.train_shards)):
        for index in range(count):
            name = shard_name(split, index)
            planned.append(
                PlannedFile(
                    f"{remote_dataset}/{name}",
                    dataset_dir / name,
                    found.expected_tokens(split, index),
                )
            )
    tokenizers_dir = out_root / "tokenizers"
    for artifact in found.tokenizer_files:
        planned.append(
            PlannedFile(
                remote_join(remote_root, artifact), tokenizer_local_path(artifact, tokenizers_dir)
            )
        )
    return planned, dataset_dir, tokenizer_local_path(found.tokenizer_files[0], tokenizers_dir)


# -----------------------------------------------------------------------------
# Checks of local files


def file_problem(
    path: Path, expected_tokens: int | None = None, suffix: str | None = None
) -> str | None:
    """Why the file at path is not a complete copy, or None when it looks complete.
    suffix (default: path's own) says what kind of file it should be."""
    suffix = path.suffix if suffix is None else suffix
    if not path.is_file():
        return "missing"
    if suffix == ".bin":
        try:
            num_tokens = read_header(path)
        except ShardError as exc:
            return str(exc)
        if expected_tokens is not None and num_tokens != expected_tokens:
            return f"{path}: {num_tokens} tokens, the manifest implies {expected_tokens}"
        return None
    if suffix == ".model":
        try:
            spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            return f"{path}: not a SentencePiece model ({exc})"
        return None
    if suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"{path}: not valid JSON ({exc})"
        return None
    return None if path.stat().st_size > 0 else f"{path}: empty"


def fetch_checked(fetcher: Fetcher, item: PlannedFile) -> None:
    """Fetches into a temporary file beside the destination, checks it, then renames it."""
    item.local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = temp_file_beside(item.local_path)
    os.close(fd)
    try:
        fetcher.fetch(item.remote_path, tmp_path)
        problem = file_problem(tmp_path, item.expected_tokens, suffix=item.local_path.suffix)
        if problem is not None:
            raise DownloadError(
                f"the fetched {item.remote_path} is not valid: "
                f"{problem.replace(str(tmp_path), 'file')}"
            )
        os.replace(tmp_path, item.local_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def manifest_cache_path(out_root: Path, repo_id: str, remote_root: str) -> Path:
    return Path(
        out_root,
        "datasets",
        MANIFESTS_DIR_NAME,
        *repo_id.split("/"),
        *remote_root.split("/"),
        "manifest.json",
    )


def load_manifest(fetcher: Fetcher, cache: Path, remote_root: str, variant: str) -> dict | None:
    """The export's manifest, None when the repo has none. A cached copy is reused unless it
    lacks the variant or describes it wrongly: the repo may have been updated since, so it is
    then fetched again."""
    if file_problem(cache) is None:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        try:
            if isinstance(cached, dict) and from_manifest(cached, variant) is not None:
                return cached
        except DownloadError:
            pass
    try:
        fetch_checked(fetcher, PlannedFile(remote_join(remote_root, "manifest.json"), cache))
    except RemoteFileMissing:
        return None
    manifest = json.loads(cache.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f"{cache} has no 'datasets' list; delete it to fetch it again")
    return manifest


# -----------------------------------------------------------------------------
# The dataset folder's manifest.json


def source_text(source: dict) -> str:
    root = source.get("remote_root")
    return f"{source.get('repo_id')}" + (f" folder {root}/" if root else "")


def check_dataset_dir(dataset_dir: Path, source: dict) -> None:
    """Refuse a dataset folder whose manifest.json something else wrote (a build of
    build_dataset.py, or a download from another repo or root): the shards of two tokenizers
    would mix. A download of the same source resumes."""
    path = dataset_dir / DATASET_MANIFEST
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        existing = None
    theirs = existing.get("source") if isinstance(existing, dict) else None
    if not (isinstance(theirs, dict) and theirs.get("kind") == DOWNLOADED):
        raise DownloadError(
            f"{display_path(dataset_dir)} holds a dataset built by build_dataset.py (it has a "
            "manifest.json); downloading into it would mix the shards of two tokenizers: build "
            "under another --name, or download with another --out-root"
        )
    if theirs != source:
        raise DownloadError(
            f"{display_path(dataset_dir)} holds shards downloaded from {source_text(theirs)} (its "
            f"{DATASET_MANIFEST} says so); downloading {source_text(source)} into it would mix "
            "two exports: download with another --out-root"
        )


def dataset_manifest(dataset_dir: Path, tokenizer_path: Path, out_root: Path, source: dict) -> dict:
    """The manifest.json of a downloaded dataset, in build_dataset.py's fields for what a download
    knows. It names the source and the tokenizer, not the shards, so that a later run with more
    --train-shards leaves it as it is."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return {
        "name": dataset_dir.name,
        "format": {
            "header_int32": HEADER_INT32,
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "token_dtype": TOKEN_DTYPE.str,
        },
        "bos_id": sp.bos_id(),
        "vocab_size": sp.vocab_size(),
        "source": source,
        "tokenizer": {
            "path": tokenizer_path.relative_to(out_root).as_posix(),
            "sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
            "trained_here": False,
        },
    }


def write_dataset_manifest(dataset_dir: Path, manifest: dict, tokenizer_path: Path) -> Path:
    """Write manifest.json beside the shards, atomically. One that says something else is kept,
    and the download refused: the shards beside it were fetched for what it says."""
    path = dataset_dir / DATASET_MANIFEST
    if not path.is_file():
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
        return path
    existing = json.loads(path.read_text(encoding="utf-8"))
    if existing == manifest:
        return path
    changed = [k for k in sorted(existing | manifest) if existing.get(k) != manifest.get(k)]
    raise DownloadError(
        f"{display_path(path)} disagrees with this download in {', '.join(changed)}, so it is "
        f"kept: if {display_path(tokenizer_path)} was replaced since the "
        "shards were downloaded, delete it and run this again to fetch it; else download with "
        "another --out-root"
    )


# -----------------------------------------------------------------------------
# Download


@dataclass(frozen=True)
class DownloadConfig:
    variant: str = DEFAULT_VARIANT
    train_shards: int = DEFAULT_TRAIN_SHARDS
    with_docs: bool = False  # also docs_selected.jsonl, to retokenize the documents
    out_root: Path = DATA_DIR  # holds datasets/ and tokenizers/
    repo_id: str | None = None  # None: the known source of the variant (KNOWN_SOURCES)
    remote_root: str | None = None  # None: the known source's root folder
    mirror: Path | None = None  # read this local copy of the hub instead of Hugging Face
    show_progress: bool = True


@dataclass
class DownloadResult:
    repo_id: str
    remote_root: str
    found_in: str  # "manifest" or "file listing"
    dataset_dir: Path
    tokenizer_path: Path
    vocab_size: int
    manifest_path: Path  # the dataset folder's manifest.json
    fetched: list[Path]
    already_complete: list[Path]


def find_variant(
    fetcher: Fetcher, config: DownloadConfig, repo_id: str, remote_root: str
) -> VariantFiles:
    manifest = load_manifest(
        fetcher,
        manifest_cache_path(config.out_root, repo_id, remote_root),
        remote_root,
        config.variant,
    )
    found = from_manifest(manifest, config.variant)
    if found is not None:
        return found
    files = fetcher.list_files()
    found = from_listing(files, remote_root, config.variant)
    if found is not None:
        return found
    where = f"{fetcher.description}" + (f" (folder {remote_root}/)" if remote_root else "")
    held = (
        "its manifest lists " + (", ".join(manifest_variants(manifest)) or "nothing")
        if manifest
        else "it has no manifest.json"
    )
    raise DownloadError(
        f"variant {config.variant!r} is not in {where}: {held}, and its files hold "
        f"{', '.join(listed_variants(files, remote_root)) or 'no variant'}. Published variants "
        f"known here: {known_variants_text()}"
    )


def download(config: DownloadConfig) -> DownloadResult:
    if config.train_shards < 0:
        raise DownloadError(f"--train-shards must be 0 or more, got {config.train_shards}")
    if not SCOREABLE_VARIANT.fullmatch(config.variant):
        raise DownloadError(
            f"--variant {config.variant}: train_gpt.py counts bytes from SentencePiece pieces, "
            "which scores plain SentencePiece exports (sp<V>: sp1024, sp4096, sp8192) only; "
            "byte-level or case-operator exports need a byte count of their own"
        )
    repo_id, remote_root = resolve_source(config.variant, config.repo_id, config.remote_root)
    staging_dir = Path(config.out_root) / "datasets" / STAGING_DIR_NAME
    if config.mirror is not None:
        if not Path(config.mirror).is_dir():
            raise DownloadError(f"--mirror {config.mirror}: no such folder")
        fetcher: Fetcher = MirrorFetcher(config.mirror, repo_id)
    else:
        fetcher = HubFetcher(repo_id, staging_dir)

    found = find_variant(fetcher, config, repo_id, remote_root)
    planned, dataset_dir, tokenizer_path = plan_downloads(found, config, remote_root)
    source = {"kind": DOWNLOADED, "repo_id": repo_id, "remote_root": remote_root}
    check_dataset_dir(dataset_dir, source)
    fetched: list[Path] = []
    complete: list[Path] = []
    for item in tqdm(
        planned, desc=found.dataset_name, unit="file", disable=not config.show_progress
    ):
        if file_problem(item.local_path, item.expected_tokens) is None:
            complete.append(item.local_path)
            continue
        item.local_path.unlink(missing_ok=True)  # partial or damaged
        fetch_checked(fetcher, item)
        fetched.append(item.local_path)
    manifest = dataset_manifest(dataset_dir, tokenizer_path, Path(config.out_root), source)
    manifest_path = write_dataset_manifest(dataset_dir, manifest, tokenizer_path)
    shutil.rmtree(staging_dir, ignore_errors=True)
    return DownloadResult(
        repo_id=repo_id,
        remote_root=remote_root,
        found_in=found.found_in,
        dataset_dir=dataset_dir,
        tokenizer_path=tokenizer_path,
        vocab_size=manifest["vocab_size"],
        manifest_path=manifest_path,
        fetched=fetched,
        already_complete=complete,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download published FineWeb shards and their tokenizer (sp1024, sp4096, "
        "sp8192) from the dataset repo that publishes the variant. Runs resume; damaged or partial "
        "files are fetched again."
    )
    parser.add_argument(
        "train_shards_positional",
        nargs="?",
        type=int,
        metavar="TRAIN_SHARDS",
        help="same as --train-shards",
    )
    parser.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        help="tokenizer variant: sp1024, sp4096, sp8192, or another sp<V> of --repo-id (default: "
        f"{DEFAULT_VARIANT})",
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help="download the first N training shards, 100M tokens each (default: "
        f"{DEFAULT_TRAIN_SHARDS})",
    )
    parser.add_argument(
        "--with-docs", action="store_true", help="also download docs_selected.jsonl and its sidecar"
    )
    parser.add_argument(
        "--out-root",
        type=Path,
        default=DATA_DIR,
        help="write datasets/ and tokenizers/ under this folder (default: the folder of this "
        "script)",
    )
    parser.add_argument(
        "--repo-id",
        help=f"Hugging Face dataset repo (default: ${REPO_ENV}, else the repo that publishes the "
        f"variant: {known_variants_text()})",
    )
    parser.add_argument(
        "--remote-root",
        help=f"folder of the export inside the repo (default: ${REMOTE_ROOT_ENV} or "
        f"{DEFAULT_REMOTE_ROOT})",
    )
    parser.add_argument(
        "--mirror",
        type=Path,
        help="read from this local copy of the hub (one folder per repo: DIR/<owner>/<name>/) "
        "instead of Hugging Face",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they show only on a terminal)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DownloadConfig(
        variant=args.variant,
        train_shards=args.train_shards
        if args.train_shards_positional is None
        else args.train_shards_positional,
        with_docs=args.with_docs,
        out_root=args.out_root,
        repo_id=args.repo_id or os.environ.get(REPO_ENV) or None,
        remote_root=args.remote_root
        if args.remote_root is not None
        else os.environ.get(REMOTE_ROOT_ENV),
        mirror=args.mirror,
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        result = download(config)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"source: {result.repo_id}"
        + (f" folder {result.remote_root}/" if result.remote_root else "")
        + f" (files from its {result.found_in})\n"
        f"dataset: {display_path(result.dataset_dir)}\n"
        f"tokenizer: {display_path(result.tokenizer_path)}\n"
        f"files: {len(result.fetched)} fetched, {len(result.already_complete)} already complete\n"
        f"train with: DATA_PATH={display_path(result.dataset_dir)} "
        f"TOKENIZER_PATH={display_path(result.tokenizer_path)} VOCAB_SIZE={result.vocab_size}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
