"""Download the challenge's published FineWeb shards and tokenizer from Hugging Face.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

The export's manifest.json (in the repo's datasets/ folder) says which variants exist,
how many shards each has and which tokenizer files belong to it. Files land in
    datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    datasets/manifest.json             (the published export's manifest)
    tokenizers/<the variant's tokenizer files>
under --out-root (default: this folder). Runs resume: complete files are kept, and a
shard whose header or size is wrong (a partial or damaged file) is fetched again. Files
appear under their final names only once complete and checked.

MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX select another repo and
root folder, as the challenge's own downloader allows; --mirror DIR reads a local copy of
the repo (same layout) instead of Hugging Face.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import sentencepiece as spm
from tqdm import tqdm

from shard_format import ShardError, display_path, read_header, set_default_permissions, shard_name

DATA_DIR = Path(__file__).resolve().parent
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_VARIANT = "sp1024"
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens: more than a 10-minute run reads
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
STAGING_DIR_NAME = ".download"  # partial downloads, kept between runs so they can resume


class DownloadError(Exception):
    """A download that cannot go on, explained for the user."""


# -----------------------------------------------------------------------------
# Fetchers: the one place that reads from the remote side. Each writes the file at
# remote_path (relative to the repo root) to destination.

Fetcher = Callable[[str, Path], None]


class HubFetcher:
    def __init__(self, repo_id: str, staging_dir: Path):
        self.repo_id = repo_id
        self.staging_dir = staging_dir
        self.description = f"Hugging Face dataset repo {repo_id}"

    def __call__(self, remote_path: str, destination: Path) -> None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors

        remote = PurePosixPath(remote_path)
        try:
            # local_dir (not the shared cache) keeps one copy of each shard on disk, and
            # keeps interrupted transfers there for the next run to resume.
            downloaded = hf_hub_download(
                repo_id=self.repo_id,
                filename=remote.name,
                subfolder=str(remote.parent) if str(remote.parent) != "." else None,
                repo_type="dataset",
                local_dir=self.staging_dir,
            )
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            reason = (
                "offline mode is on (HF_HUB_OFFLINE); unset it to download"
                if offline
                else "huggingface.co cannot be reached; check the network connection"
            )
            raise DownloadError(
                f"cannot download {remote_path} from {self.description}: {reason}, "
                "or pass --mirror DIR to read a local copy of the repo"
            ) from None
        except hf_errors.GatedRepoError:
            raise DownloadError(
                f"{self.description} is gated: accept its terms on huggingface.co and log in (hf auth login)"
            ) from None
        except hf_errors.RepositoryNotFoundError:
            raise DownloadError(
                f"{self.description} does not exist or is private; check {REPO_ENV} or --repo-id"
            ) from None
        except hf_errors.RemoteEntryNotFoundError:
            raise DownloadError(
                f"{remote_path} is not in {self.description}; check {REMOTE_ROOT_ENV} or --remote-root"
            ) from None
        except Exception as exc:  # the network boundary: any other failure ends the run with one message
            raise DownloadError(f"cannot download {remote_path} from {self.description}: {exc}") from None
        os.replace(downloaded, destination)


class MirrorFetcher:
    """Reads a local folder laid out like the repo (e.g. a copy on a shared disk)."""

    def __init__(self, mirror_dir: Path):
        self.mirror_dir = Path(mirror_dir)
        self.description = f"mirror {mirror_dir}"

    def __call__(self, remote_path: str, destination: Path) -> None:
        source = self.mirror_dir / remote_path
        if not source.is_file():
            raise DownloadError(f"{remote_path} is not in the {self.description} (no file {source})")
        shutil.copyfile(source, destination)


# -----------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class PlannedFile:
    remote_path: str
    local_path: Path
    expected_tokens: int | None = None  # for shards, when the manifest implies it


def remote_join(remote_root: str, *parts: str) -> str:
    return "/".join(p.strip("/") for p in (remote_root, *parts) if p.strip("/"))


def find_dataset(manifest: dict, variant: str) -> dict:
    datasets = [d for d in manifest.get("datasets", []) if isinstance(d, dict) and "name" in d]
    for entry in datasets:
        if entry["name"] == variant or entry["name"].split("_", 1)[-1] == variant:
            return entry
    available = ", ".join(sorted(d["name"].split("_", 1)[-1] for d in datasets)) or "none"
    raise DownloadError(f"variant {variant!r} is not in the manifest; it lists: {available}")


def expected_shard_tokens(manifest: dict, stats: dict, split: str, index: int) -> int | None:
    """Every shard but a split's last holds shard_size tokens; the last holds the rest."""
    try:
        shard_size = int(manifest["shard_size"])
        files = int(stats[f"files_{split}"])
        tokens = int(stats[f"tokens_{split}"])
    except (KeyError, TypeError, ValueError):
        return None
    expected = shard_size if index < files - 1 else tokens - (files - 1) * shard_size
    return expected if 0 < expected <= shard_size else None


def tokenizer_local_path(artifact: str, tokenizers_dir: Path) -> Path:
    parts = PurePosixPath(artifact).parts
    if not parts or PurePosixPath(artifact).is_absolute() or ".." in parts:
        raise DownloadError(f"the manifest names an unsafe tokenizer path {artifact!r}")
    if parts[0] == "tokenizers":
        parts = parts[1:]
    return tokenizers_dir.joinpath(*parts)


def plan_downloads(manifest: dict, config: DownloadConfig) -> tuple[dict, list[PlannedFile], Path, Path]:
    """The variant's dataset entry, the files to fetch, its dataset folder and tokenizer model path."""
    out_root = Path(config.out_root)
    entry = find_dataset(manifest, config.variant)
    stats = entry.get("stats") or {}
    try:
        files_val = int(stats["files_val"])
        files_train = int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"the manifest entry for {entry['name']} lacks stats.files_val / stats.files_train") from None
    if config.train_shards > files_train:
        raise DownloadError(
            f"{config.variant} has {files_train} training shards, --train-shards asks for {config.train_shards}"
        )
    tokenizer_name = entry.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(f"the manifest lists no tokenizer {tokenizer_name!r} for {entry['name']}")
    artifacts = [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    if not artifacts:
        raise DownloadError(f"the manifest's tokenizer {tokenizer_name!r} names no files")

    dataset_dir = out_root / "datasets" / entry["name"]
    remote_dataset = remote_join(config.remote_root, "datasets", entry["name"])
    planned: list[PlannedFile] = []
    if config.with_docs:
        planned += [
            PlannedFile(remote_join(config.remote_root, name), out_root / "datasets" / name) for name in DOCS_FILES
        ]
    for split, count in (("val", files_val), ("train", config.train_shards)):
        for index in range(count):
            name = shard_name(split, index)
            expected = expected_shard_tokens(manifest, stats, split, index)
            planned.append(PlannedFile(f"{remote_dataset}/{name}", dataset_dir / name, expected))
    tokenizers_dir = out_root / "tokenizers"
    for artifact in artifacts:
        planned.append(PlannedFile(remote_join(config.remote_root, artifact), tokenizer_local_path(artifact, tokenizers_dir)))
    tokenizer_path = tokenizer_local_path(artifacts[0], tokenizers_dir)
    return entry, planned, dataset_dir, tokenizer_path


# -----------------------------------------------------------------------------
# Checks of local files


def file_problem(path: Path, expected_tokens: int | None = None, suffix: str | None = None) -> str | None:
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


def fetch_checked(fetch: Fetcher, item: PlannedFile) -> None:
    """Fetches into a temporary file beside the destination, checks it, then renames it."""
    item.local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=item.local_path.parent, prefix=f".{item.local_path.name}.", suffix=".tmp")
    set_default_permissions(fd)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        fetch(item.remote_path, tmp_path)
        problem = file_problem(tmp_path, item.expected_tokens, suffix=item.local_path.suffix)
        if problem is not None:
            raise DownloadError(f"the fetched {item.remote_path} is not valid: {problem.replace(str(tmp_path), 'file')}")
        os.replace(tmp_path, item.local_path)
    finally:
        tmp_path.unlink(missing_ok=True)


def load_manifest(fetch: Fetcher, config: DownloadConfig) -> dict:
    item = PlannedFile(remote_join(config.remote_root, "manifest.json"), Path(config.out_root) / "datasets" / "manifest.json")
    if file_problem(item.local_path) is not None:
        fetch_checked(fetch, item)
    manifest = json.loads(item.local_path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DownloadError(f"{item.local_path} has no 'datasets' list; delete it to fetch it again")
    return manifest


# -----------------------------------------------------------------------------
# Download


@dataclass(frozen=True)
class DownloadConfig:
    variant: str = DEFAULT_VARIANT
    train_shards: int = DEFAULT_TRAIN_SHARDS
    with_docs: bool = False  # also docs_selected.jsonl, to retokenize the documents
    out_root: Path = DATA_DIR  # holds datasets/ and tokenizers/
    repo_id: str = DEFAULT_REPO_ID
    remote_root: str = DEFAULT_REMOTE_ROOT
    mirror: Path | None = None  # read this local copy of the repo instead of Hugging Face
    show_progress: bool = True


@dataclass
class DownloadResult:
    dataset_dir: Path
    tokenizer_path: Path
    vocab_size: int | None
    fetched: list[Path]
    already_complete: list[Path]


def download(config: DownloadConfig) -> DownloadResult:
    if config.train_shards < 0:
        raise DownloadError(f"--train-shards must be 0 or more, got {config.train_shards}")
    staging_dir = Path(config.out_root) / "datasets" / STAGING_DIR_NAME
    if config.mirror is not None:
        if not Path(config.mirror).is_dir():
            raise DownloadError(f"--mirror {config.mirror}: no such folder")
        fetch: Fetcher = MirrorFetcher(config.mirror)
    else:
        fetch = HubFetcher(config.repo_id, staging_dir)

    manifest = load_manifest(fetch, config)
    entry, planned, dataset_dir, tokenizer_path = plan_downloads(manifest, config)
    fetched: list[Path] = []
    complete: list[Path] = []
    for item in tqdm(planned, desc=entry["name"], unit="file", disable=not config.show_progress):
        if file_problem(item.local_path, item.expected_tokens) is None:
            complete.append(item.local_path)
            continue
        item.local_path.unlink(missing_ok=True)  # partial or damaged
        fetch_checked(fetch, item)
        fetched.append(item.local_path)
    shutil.rmtree(staging_dir, ignore_errors=True)
    vocab_size = entry.get("vocab_size")
    return DownloadResult(
        dataset_dir=dataset_dir,
        tokenizer_path=tokenizer_path,
        vocab_size=int(vocab_size) if vocab_size is not None else None,
        fetched=fetched,
        already_complete=complete,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download the challenge's published FineWeb shards and tokenizer. Runs resume; "
        "damaged or partial files are fetched again."
    )
    parser.add_argument(
        "train_shards_positional", nargs="?", type=int, metavar="TRAIN_SHARDS", help="same as --train-shards"
    )
    parser.add_argument(
        "--variant",
        default=DEFAULT_VARIANT,
        help=f"tokenizer variant as listed in the manifest: sp1024, sp4096, ... (default: {DEFAULT_VARIANT})",
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help=f"download the first N training shards, 100M tokens each (default: {DEFAULT_TRAIN_SHARDS})",
    )
    parser.add_argument("--with-docs", action="store_true", help="also download docs_selected.jsonl and its sidecar")
    parser.add_argument(
        "--out-root",
        type=Path,
        default=DATA_DIR,
        help="write datasets/ and tokenizers/ under this folder (default: the folder of this script)",
    )
    parser.add_argument(
        "--repo-id",
        default=os.environ.get(REPO_ENV, DEFAULT_REPO_ID),
        help=f"Hugging Face dataset repo (default: ${REPO_ENV} or {DEFAULT_REPO_ID})",
    )
    parser.add_argument(
        "--remote-root",
        default=os.environ.get(REMOTE_ROOT_ENV, DEFAULT_REMOTE_ROOT),
        help=f"folder of the export inside the repo (default: ${REMOTE_ROOT_ENV} or {DEFAULT_REMOTE_ROOT})",
    )
    parser.add_argument(
        "--mirror", type=Path, help="read from this local copy of the repo (same layout) instead of Hugging Face"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they show only on a terminal)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DownloadConfig(
        variant=args.variant,
        train_shards=args.train_shards if args.train_shards_positional is None else args.train_shards_positional,
        with_docs=args.with_docs,
        out_root=args.out_root,
        repo_id=args.repo_id,
        remote_root=args.remote_root,
        mirror=args.mirror,
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )
    try:
        result = download(config)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"dataset: {display_path(result.dataset_dir)}\n"
        f"tokenizer: {display_path(result.tokenizer_path)}\n"
        f"files: {len(result.fetched)} fetched, {len(result.already_complete)} already complete\n"
        f"train with: DATA_PATH={display_path(result.dataset_dir)} TOKENIZER_PATH={display_path(result.tokenizer_path)}"
        + (f" VOCAB_SIZE={result.vocab_size}" if result.vocab_size is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
