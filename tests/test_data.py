"""CPU tests of data/: the shard format, the dataset builder and the downloader.

Everything writes into pytest's tmp folders; corpora and vocabularies are tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from conftest import split_documents, split_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
sys.path.insert(0, str(DATA_DIR))  # the data scripts import their shared module by name

import build_dataset  # noqa: E402
import cached_challenge_fineweb as downloader  # noqa: E402
from build_dataset import BuildConfig, DatasetError, build  # noqa: E402
from cached_challenge_fineweb import DownloadConfig, DownloadError, download  # noqa: E402
from shard_format import (  # noqa: E402
    HEADER_BYTES,
    SHARD_MAGIC,
    ShardError,
    current_umask,
    read_header,
    read_shard,
    shard_paths,
    write_bytes_atomic,
    write_shard,
    write_text_atomic,
)

VOCAB = 384  # 4 special + 256 byte pieces + the corpus' characters + some merges
SHARD_TOKENS = 1000
VAL_DOCS = 5
MIN_TOKENS = 64


def make_docs(count: int, seed: int = 0) -> list[str]:
    """Distinct documents of made-up words, sentences and numbers."""
    rng = random.Random(seed)
    syllables = [
        "ka",
        "lo",
        "mi",
        "ne",
        "ru",
        "sa",
        "ti",
        "vo",
        "ze",
        "pa",
        "do",
        "fi",
        "gu",
        "he",
        "ja",
        "bo",
    ]
    words = sorted(
        {"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)}
    )
    docs = []
    for index in range(count):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
            sentences.append(sentence.capitalize() + f" {rng.randint(0, 99999)}.")
        docs.append(
            f"Document {index}. "
            + " ".join(sentences)
            + ("\n\nNotes: " + rng.choice(words) if index % 3 else "")
        )
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(docs)),
        encoding="utf-8",
    )
    return path


def tiny_config(docs: Path, out_root: Path, **overrides) -> BuildConfig:
    settings = dict(
        docs=docs,
        vocab_size=VOCAB,
        val_docs=VAL_DOCS,
        min_tokens=MIN_TOKENS,
        shard_tokens=SHARD_TOKENS,
        out_root=out_root,
        workers=2,
        show_progress=False,
    )
    settings.update(overrides)
    return BuildConfig(**settings)


def docs_sha256(docs: list[str]) -> str:
    hasher = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        hasher.update(len(data).to_bytes(8, "little") + data)
    return hasher.hexdigest()


def no_temp_leftovers(root: Path) -> bool:
    return not [
        p
        for p in root.rglob("*")
        if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One dataset built from a JSONL corpus: (docs, result)."""
    root = tmp_path_factory.mktemp("tiny")
    docs = make_docs(60)
    result = build(tiny_config(write_jsonl(root / "tiny.jsonl", docs), root / "out"))
    return docs, result


# -----------------------------------------------------------------------------
# Shard format


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.array([1, 0, 65535, 7, 300, 1, 2], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)

    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, tokens.size]
    assert not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    raw = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)
    assert raw.tolist() == tokens.tolist()
    assert read_header(path) == tokens.size
    assert np.asarray(read_shard(path)).tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left

    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([65536]))
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([-1]))
    assert not (tmp_path / "bad.bin").exists()


def test_read_header_rejects_damaged_shards(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100))
    data = path.read_bytes()

    path.write_bytes(data[:-2])  # one token short: an interrupted download
    with pytest.raises(ShardError, match="header says 100 tokens"):
        read_header(path)
    path.write_bytes(data[:500])
    with pytest.raises(ShardError, match="shorter than"):
        read_header(path)
    bad_magic = bytearray(data)
    bad_magic[0] ^= 0xFF
    path.write_bytes(bytes(bad_magic))
    with pytest.raises(ShardError, match=f"magic {SHARD_MAGIC}"):
        read_header(path)


def test_atomic_writes_publish_whole_files_with_default_permissions(tmp_path, monkeypatch):
    path = tmp_path / "new" / "out.txt"
    write_text_atomic(path, "héllo\n")
    assert (
        path.read_bytes() == "héllo\n".encode()
        and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask()
    )
    write_bytes_atomic(path, b"replaced")
    assert path.read_bytes() == b"replaced"

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(path, b"lost")
    assert path.read_bytes() == b"replaced"  # the old file is untouched, the temporary one gone
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


# -----------------------------------------------------------------------------
# Dataset builder


def test_build_splits_bos_and_disjointness(tiny):
    docs, result = tiny
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    val_docs = split_documents(split_tokens(result.dataset_dir, "val"))
    train_docs = split_documents(split_tokens(result.dataset_dir, "train"))

    # Every document is BOS + its encoding; val holds the first VAL_DOCS in order, train the rest.
    assert val_docs == [sp.encode(doc) for doc in docs[:VAL_DOCS]]
    assert train_docs == [sp.encode(doc) for doc in docs[VAL_DOCS:]]
    assert not {tuple(d) for d in val_docs} & {tuple(d) for d in train_docs}
    assert sp.eos_id() not in split_tokens(result.dataset_dir, "train")

    names = [p.name for p in shard_paths(result.dataset_dir, "train")]
    assert len(names) > 1  # small shards, so documents also cross shard boundaries
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(len(names))]
    assert [p.name for p in shard_paths(result.dataset_dir, "val")] == ["fineweb_val_000000.bin"]
    assert [read_header(p) for p in shard_paths(result.dataset_dir, "train")[:-1]] == [
        SHARD_TOKENS
    ] * (len(names) - 1)


def test_manifest_counts_match_shards(tiny):
    docs, result = tiny
    manifest = json.loads((result.dataset_dir / "manifest.json").read_text())
    assert manifest == result.manifest
    stats = manifest["stats"]
    val_tokens = split_tokens(result.dataset_dir, "val")
    train_tokens = split_tokens(result.dataset_dir, "train")
    assert stats["tokens_val"] == val_tokens.size
    assert stats["tokens_train"] == train_tokens.size
    assert stats["tokens_total"] == val_tokens.size + train_tokens.size
    assert stats["docs_val"] == int((val_tokens == 1).sum()) == VAL_DOCS
    assert stats["docs_train"] == int((train_tokens == 1).sum()) == len(docs) - VAL_DOCS
    assert stats["bytes_val"] == sum(len(d.encode()) for d in docs[:VAL_DOCS])
    assert stats["bytes_train"] == sum(len(d.encode()) for d in docs[VAL_DOCS:])
    assert stats["files_val"] + stats["files_train"] == len(manifest["files"])
    on_disk = {p.name: read_header(p) for p in sorted(result.dataset_dir.glob("*.bin"))}
    assert {f["name"]: f["tokens"] for f in manifest["files"]} == on_disk
    assert manifest["docs_sha256"] == docs_sha256(docs)
    assert (
        manifest["tokenizer"]["sha256"]
        == hashlib.sha256(result.tokenizer_path.read_bytes()).hexdigest()
    )
    assert manifest["tokenizer"]["path"] == f"tokenizers/tiny_{VOCAB}_bpe.model"
    # never on validation text
    assert manifest["tokenizer"]["trained_on_docs"] == len(docs) - VAL_DOCS
    assert result.dataset_dir.name == f"tiny_sp{VOCAB}"
    assert result.tokenizer_path.with_suffix(".vocab").is_file()
    assert no_temp_leftovers(result.dataset_dir.parent.parent)
    # Built in private temporary places, published with the permissions of ordinary files.
    umask = current_umask()
    assert stat.S_IMODE(result.dataset_dir.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in result.dataset_dir.iterdir()} == {
        0o666 & ~umask
    }


def test_tokenizer_settings(tiny):
    _, result = tiny
    assert build_dataset.SPM_SETTINGS == {
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
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_control(i) for i in (0, 1, 2)) and sp.is_unknown(3)
    byte_ids = [i for i in range(VOCAB) if sp.is_byte(i)]
    assert [sp.id_to_piece(i) for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    # Byte fallback: a character never seen in training becomes its UTF-8 bytes, losslessly.
    parrot = sp.encode("🦜")
    assert len(parrot) == 4 and all(sp.is_byte(i) for i in parrot) and sp.decode(parrot) == "🦜"
    # Digits are split: every digit is its own piece.
    digit_pieces = [
        p for p in sp.encode("ka 20240520 lo", out_type=str) if any(c.isdigit() for c in p)
    ]
    assert "".join(digit_pieces).replace("▁", "") == "20240520"
    assert all(len(p.replace("▁", "")) == 1 for p in digit_pieces)
    # No dummy prefix: a text's first word gets no "▁"; nmt_nfkc folds full-width letters.
    assert not sp.encode("kalo mine", out_type=str)[0].startswith("▁")
    assert sp.encode("ｋａｌｏ") == sp.encode("kalo")


def test_build_is_deterministic(tmp_path, tiny):
    docs, result = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    again = build(tiny_config(corpus, tmp_path / "again", workers=1))
    assert again.tokenizer_path.read_bytes() == result.tokenizer_path.read_bytes()
    for path in sorted(result.dataset_dir.glob("*.bin")):
        assert (again.dataset_dir / path.name).read_bytes() == path.read_bytes()
    assert again.manifest["docs_sha256"] == result.manifest["docs_sha256"]


def test_reuse_tokenizer(tmp_path, tiny):
    docs, result = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    reused = build(
        tiny_config(
            corpus, tmp_path / "out", name="again", tokenizer=result.tokenizer_path, vocab_size=None
        )
    )
    assert reused.dataset_dir.name == f"again_sp{VOCAB}"
    assert reused.tokenizer_path == result.tokenizer_path
    assert not (tmp_path / "out" / "tokenizers" / f"again_{VOCAB}_bpe.model").exists()
    assert reused.manifest["tokenizer"]["trained_here"] is False
    for split in ("val", "train"):
        assert np.array_equal(
            split_tokens(reused.dataset_dir, split), split_tokens(result.dataset_dir, split)
        )
    with pytest.raises(DatasetError, match=f"--vocab-size 512 does not match .*{VOCAB} pieces"):
        build(
            tiny_config(corpus, tmp_path / "other", tokenizer=result.tokenizer_path, vocab_size=512)
        )


def test_directory_input(tmp_path):
    texts = make_docs(30, seed=3)
    root = tmp_path / "notes"
    files = {
        "a.txt": texts[0],
        "b/c.md": texts[1],
        "b/d.TXT": texts[2],
        "e.txt": "\ufeff" + texts[3],  # a byte-order mark is dropped
    }
    files.update({f"f/{i:02d}.txt": text for i, text in enumerate(texts[4:])})
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "skip.py").write_text("not a document")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden")
    (root / "dir.txt").mkdir()  # a folder with a document's suffix is not a document

    result = build(tiny_config(root, tmp_path / "out", val_docs=3))
    assert result.dataset_dir.name == f"notes_sp{VOCAB}"
    ordered = [files[rel].removeprefix("\ufeff") for rel in sorted(files)]
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    assert split_documents(split_tokens(result.dataset_dir, "val")) == [
        sp.encode(t) for t in ordered[:3]
    ]
    assert split_documents(split_tokens(result.dataset_dir, "train")) == [
        sp.encode(t) for t in ordered[3:]
    ]
    assert result.manifest["source"]["kind"] == "dir"
    assert result.manifest["docs_sha256"] == docs_sha256(ordered)


def test_max_docs_and_max_bytes(tmp_path, tiny):
    docs, _ = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    by_docs = build(tiny_config(corpus, tmp_path / "a", max_docs=20))
    assert by_docs.manifest["stats"]["docs_total"] == 20
    limit = sum(len(d.encode()) for d in docs[:30]) - 1  # reached inside document 30, which is kept
    by_bytes = build(tiny_config(corpus, tmp_path / "b", max_bytes=limit))
    assert by_bytes.manifest["stats"]["docs_total"] == 30
    assert by_bytes.manifest["docs_sha256"] == docs_sha256(docs[:30])


def test_refuses_to_overwrite_unless_forced(tmp_path, tiny):
    docs, _ = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    first = build(tiny_config(corpus, tmp_path / "out"))
    with pytest.raises(DatasetError, match="already exists; pass --force"):
        build(tiny_config(corpus, tmp_path / "out", val_docs=7))
    assert first.manifest == json.loads((first.dataset_dir / "manifest.json").read_text())
    forced = build(tiny_config(corpus, tmp_path / "out", val_docs=7, force=True))
    assert json.loads((forced.dataset_dir / "manifest.json").read_text())["stats"]["docs_val"] == 7
    assert no_temp_leftovers(tmp_path / "out")


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.jsonl", "no such file or folder"),
        (lambda d: _write_bytes(d / "empty.jsonl", b""), "holds no documents"),
        (lambda d: _write_bytes(d / "blank.jsonl", b'{"text": ""}\n' * 20), "hold no text"),
        (
            lambda d: _write_bytes(
                d / "latin1.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n'
            ),
            r"latin1.jsonl line 3: not valid UTF-8 \(byte 0xe9",
        ),
        (
            lambda d: _write_bytes(d / "broken.jsonl", b'{"text": "ok"}\n{"text": \n'),
            "broken.jsonl line 2: not valid JSON",
        ),
        (
            lambda d: _write_bytes(d / "field.jsonl", b'{"body": "ok"}\n'),
            'line 1: expected a JSON object with a string "text"',
        ),
        (
            lambda d: _write_bytes(d / "surrogate.jsonl", b'{"text": "a \\ud800 b"}\n'),
            "unpaired surrogate",
        ),
        (lambda d: d, "no .txt or .md files"),
    ],
    ids=[
        "missing",
        "empty",
        "empty-texts",
        "not-utf8",
        "bad-json",
        "no-text-field",
        "surrogate",
        "no-documents-in-dir",
    ],
)
def test_input_errors(tmp_path, make_input, message):
    source = make_input(tmp_path)
    with pytest.raises(DatasetError, match=message):
        build(tiny_config(source, tmp_path / "out", val_docs=1))
    assert not (tmp_path / "out" / "datasets" / f"{Path(source).stem}_sp{VOCAB}").exists()
    assert no_temp_leftovers(tmp_path)


def test_directory_errors(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("fine text " * 50)
    (root / "b.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DatasetError, match=r"b\.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        build(tiny_config(root, tmp_path / "out", val_docs=1))
    (root / "b.txt").unlink()
    (root / "c.txt").symlink_to(root / "gone.txt")
    with pytest.raises(DatasetError, match=r"c\.txt: no such file"):
        build(tiny_config(root, tmp_path / "out", val_docs=1))


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without read permission"
)
def test_unreadable_file(tmp_path):
    corpus = write_jsonl(tmp_path / "locked.jsonl", make_docs(10))
    corpus.chmod(0)
    with pytest.raises(DatasetError, match="cannot read .*locked.jsonl"):
        build(tiny_config(corpus, tmp_path / "out", val_docs=1))


def test_too_small_inputs(tmp_path, tiny):
    docs, _ = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    with pytest.raises(
        DatasetError,
        match=r"val split \(first 1 documents\) has \d+ tokens, fewer than --min-tokens 1025",
    ):
        build(tiny_config(corpus, tmp_path / "out", val_docs=1, min_tokens=1025))
    # One training document, encoded with the tiny tokenizer (one trained on it would fail first).
    sp = spm.SentencePieceProcessor(model_file=str(tiny[1].tokenizer_path))
    last = len(sp.encode(docs[-1])) + 1
    with pytest.raises(
        DatasetError,
        match=rf"train split \(documents after the first 59\) has {last} tokens, fewer than "
        rf"--min-tokens {last + 1}",
    ):
        build(
            tiny_config(
                corpus,
                tmp_path / "out",
                val_docs=59,
                min_tokens=last + 1,
                tokenizer=tiny[1].tokenizer_path,
                vocab_size=None,
            )
        )
    with pytest.raises(
        DatasetError,
        match=r"60 documents, and the validation split \(the first 60\) takes all of them",
    ):
        build(tiny_config(corpus, tmp_path / "out", val_docs=60))
    with pytest.raises(DatasetError, match="SentencePiece learned only|could not train"):
        build(tiny_config(corpus, tmp_path / "out", vocab_size=4096))
    with pytest.raises(DatasetError, match="must exceed 260"):
        build(tiny_config(corpus, tmp_path / "out", vocab_size=256))
    assert no_temp_leftovers(tmp_path / "out")


def test_trainer_sentences_fit_sentencepiece_limit():
    long_line = " ".join(["wörd"] * 3000)  # one 15 kB line, 'ö' is 2 bytes
    text = "short line\n" * 700 + long_line + "\nend\x00here"
    sentences = list(build_dataset.trainer_sentences(text))
    assert len(sentences) > 3
    assert all(0 < len(s.encode("utf-8")) <= build_dataset.SPM_SENTENCE_BYTES for s in sentences)
    # nothing lost, nothing reordered
    assert " ".join(sentences).split() == text.replace("\x00", " ").split()


def test_cli_error_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(DATA_DIR / "build_dataset.py"),
            "--docs",
            str(tmp_path / "bad.jsonl"),
            "--out-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "not valid UTF-8" in proc.stderr


# -----------------------------------------------------------------------------
# The --val-docs default and --tokenizer-train-docs


def reference_val_docs(sizes: list[int], min_tokens: int) -> int:
    """The documented rule, written out with whole-list sums."""
    if len(sizes) >= 10 * 50_000:
        return 50_000
    tenth = max(1, len(sizes) // 10)
    holding = next(
        (k for k in range(1, len(sizes) + 1) if sum(sizes[:k]) >= 8 * min_tokens), len(sizes)
    )
    return max(tenth, min(holding, len(sizes) // 2))


def test_default_val_split_follows_the_rule():
    # a corpus a new user might bring
    assert build_dataset.default_val_split([3000] * 1500, 1025).docs == 150
    # a tenth (2) holds 200 of 512 bytes
    assert build_dataset.default_val_split([100] * 20, 64).docs == 6
    assert build_dataset.default_val_split([100] * 5, 1025).docs == 2  # never more than half
    assert build_dataset.default_val_split([5000], 1025).docs == 1
    rng = random.Random(5)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 50, 300, 5000]) for _ in range(rng.randint(1, 120))]
        min_tokens = rng.choice([1, 64, 1025])
        split = build_dataset.default_val_split(iter(sizes), min_tokens)
        assert split.docs == reference_val_docs(sizes, min_tokens), (sizes, min_tokens)
        assert "tenth" in split.reason and f"{len(sizes):,} documents" in split.reason


def test_default_val_split_is_the_challenge_split_for_large_corpora():
    read = 0

    def endless_sizes():
        nonlocal read
        while True:
            read += 1
            yield 2500

    split = build_dataset.default_val_split(endless_sizes(), 1025)
    assert split.docs == 50_000 and read == 500_000  # stops reading once the corpus is large enough
    assert "challenge's split" in split.reason
    assert build_dataset.default_val_split([2500] * 499_999, 1025).docs == 49_999


def test_a_corpus_of_1500_documents_builds_with_the_defaults(tmp_path, capsys):
    docs = make_docs(1500, seed=7)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    assert (
        build_dataset.main(
            ["--docs", str(corpus), "--out-root", str(tmp_path / "out"), "--no-progress"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        "val_docs: 150 (a tenth of the corpus' 1,500 documents; --val-docs sets another)"
        in captured.err
    )
    manifest = json.loads(
        (tmp_path / "out" / "datasets" / "corpus_sp1024" / "manifest.json").read_text()
    )
    assert manifest["val_docs"] == {"count": 150, "from": "a tenth of the corpus' 1,500 documents"}
    assert (manifest["stats"]["docs_val"], manifest["stats"]["docs_train"]) == (150, 1350)
    assert manifest["tokenizer"]["trained_on_doc_numbers"] == [151, 1500]
    assert manifest["stats"]["tokens_val"] >= build_dataset.DEFAULT_MIN_TOKENS


def test_small_corpus_validation_split_holds_one_sequence(tmp_path):
    docs = make_docs(60, seed=11)  # a tenth, 6 documents, holds fewer than 8 x 1025 bytes
    corpus = write_jsonl(tmp_path / "small.jsonl", docs)
    result = build(tiny_config(corpus, tmp_path / "out", val_docs=None, min_tokens=1025))
    expected = reference_val_docs([len(d.encode()) for d in docs], 1025)
    assert 6 < expected < 30
    assert result.manifest["stats"]["docs_val"] == expected
    assert result.manifest["stats"]["tokens_val"] >= 1025
    assert result.manifest["tokenizer"]["trained_on_doc_numbers"] == [expected + 1, 60]


def test_tokenizer_train_docs_uses_the_training_documents_among_the_first_n(tmp_path, tiny):
    docs, _ = tiny
    corpus = write_jsonl(tmp_path / "tiny.jsonl", docs)
    result = build(tiny_config(corpus, tmp_path / "out", tokenizer_train_docs=40))
    info = result.manifest["tokenizer"]
    assert (info["trained_on_docs"], info["trained_on_doc_numbers"]) == (
        40 - VAL_DOCS,
        [VAL_DOCS + 1, 40],
    )
    assert info["trained_on_bytes"] == sum(len(d.encode()) for d in docs[VAL_DOCS:40])
    assert info["tokenizer_train_bytes"] is None  # no byte cap unless asked for
    # The same model as one trained directly on documents 6..40, not the one trained on all of them.
    sentences = [s for doc in docs[VAL_DOCS:40] for s in build_dataset.trainer_sentences(doc)]
    direct = build_dataset.train_tokenizer(sentences, vocab_size=VOCAB, source="reference")
    assert result.tokenizer_path.read_bytes() == direct
    assert tiny[1].tokenizer_path.read_bytes() != direct
    # Every document is still encoded, in its split.
    assert result.manifest["stats"]["docs_train"] == len(docs) - VAL_DOCS

    with pytest.raises(
        DatasetError, match=f"--tokenizer-train-docs {VAL_DOCS}: .*give more than {VAL_DOCS}"
    ):
        build(tiny_config(corpus, tmp_path / "other", tokenizer_train_docs=VAL_DOCS))
    with pytest.raises(DatasetError, match="--tokenizer reuses one"):
        build(
            tiny_config(
                corpus,
                tmp_path / "other",
                tokenizer=result.tokenizer_path,
                vocab_size=None,
                tokenizer_train_docs=40,
            )
        )
    with pytest.raises(DatasetError, match="--tokenizer-train-docs must be at least 1"):
        build(tiny_config(corpus, tmp_path / "other", tokenizer_train_docs=0))


def test_tokenizer_text_streams_and_reports_bad_input_after_training(tmp_path, tiny):
    docs, _ = tiny
    lines = [json.dumps({"text": doc}) for doc in docs]
    lines[40] = '{"text": "cut off'  # a bad line inside the tokenizer's training text
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl line 41: not valid JSON"):
        build(tiny_config(corpus, tmp_path / "out"))
    assert no_temp_leftovers(tmp_path / "out")

    # SentencePiece reads the sentences as they come; an error while reading them is raised
    # as it was, whether training then succeeds on what came before or fails for lack of text.
    def failing_after(count: int):
        yield from [s for doc in docs for s in build_dataset.trainer_sentences(doc)][:count]
        raise DatasetError("corpus line 9: not valid JSON")

    for count in (200, 0):
        with pytest.raises(DatasetError, match="corpus line 9: not valid JSON") as err:
            build_dataset.train_tokenizer(failing_after(count), vocab_size=VOCAB, source="corpus")
        assert type(err.value) is DatasetError


# -----------------------------------------------------------------------------
# The built-in Python docs corpus


def test_extract_units_reads_docstrings_and_comments(tmp_path):
    source = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring."""
import os  # a trailing remark is not a comment block

# Two lines of comment
# make one block.
X = """
# not a comment: inside a string
"""
# type: ignore
# ---------------


class Thing:
    """Class docstring.

        Indented detail.
    """

    def go(self):  # noqa
        """Method docstring."""
        # Inner comment.
        return 1
'''
    (tmp_path / "m.py").write_text(source)
    units = build_dataset.extract_units(("stdlib", str(tmp_path), "m.py"))
    assert units == [
        "Module docstring.",
        "Two lines of comment\nmake one block.",
        "Class docstring.\n\nIndented detail.",
        "Method docstring.",
        "Inner comment.",
    ]
    (tmp_path / "bad.py").write_text("def broken(:\n    '''Never read.'''\n")
    assert build_dataset.extract_units(("stdlib", str(tmp_path), "bad.py")) == []


def test_pydocs_corpus_is_deterministic():
    first, info = build_dataset.collect_pydocs(max_bytes=200_000, workers=2, show_progress=False)
    second, _ = build_dataset.collect_pydocs(max_bytes=200_000, workers=1, show_progress=False)
    assert first == second
    assert sum(len(d.encode()) for d in first) >= 200_000
    assert info["sources_read"] < info["sources_available"]
    assert any("Return" in doc for doc in first)  # prose from docstrings


def test_default_build_without_docs(tmp_path, capsys):
    out_root = tmp_path / "out"
    argv = [
        "--out-root",
        str(out_root),
        "--max-bytes",
        "300000",
        "--val-docs",
        "10",
        "--min-tokens",
        str(MIN_TOKENS),
    ]
    assert build_dataset.main(argv) == 0
    dataset_dir = out_root / "datasets" / "pydocs_sp1024"
    model = out_root / "tokenizers" / "pydocs_1024_bpe.model"
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "pydocs" and manifest["vocab_size"] == 1024
    assert manifest["stats"]["docs_val"] == 10 and manifest["stats"]["docs_train"] > 10
    assert spm.SentencePieceProcessor(model_file=str(model)).vocab_size() == 1024
    assert len(split_documents(split_tokens(dataset_dir, "val"))) == 10
    printed = capsys.readouterr().out
    assert f"DATA_PATH={os.path.relpath(dataset_dir)}" in printed and "VOCAB_SIZE=1024" in printed


# -----------------------------------------------------------------------------
# Downloader, against a fake hub: a local folder holding one folder per repo (OWNER/NAME/),
# each laid out like the published exports

HUB_SHARD_SIZE = 1000
HUB_VAL_TOKENS = 700
HUB_TRAIN_SHARDS = [1000, 1000, 400]
CHALLENGE_REPO = "willdepueoai/parameter-golf"
RECORDS_REPO = "kevclark/parameter-golf"


def write_export(
    repo: Path,
    tokenizer: Path,
    *,
    listed: tuple[str, ...],
    unlisted: tuple[str, ...] = (),
    listed_without_files: tuple[str, ...] = (),
    manifest: bool = True,
    root: str = "datasets",
) -> Path:
    """An export under repo/root/: shards and tokenizer files for the `listed` and `unlisted`
    variants, and a manifest.json (unless manifest=False) that lists `listed` and
    `listed_without_files` only. Every tokenizer file is a copy of the tiny one, named as the export
    names it."""
    export = repo / root
    rng = np.random.default_rng(len(str(repo)))
    for variant in listed + unlisted:
        shards = export / "datasets" / f"fineweb10B_{variant}"
        shards.mkdir(parents=True)
        write_shard(shards / "fineweb_val_000000.bin", rng.integers(0, VOCAB, HUB_VAL_TOKENS))
        for index, size in enumerate(HUB_TRAIN_SHARDS):
            write_shard(shards / f"fineweb_train_{index:06d}.bin", rng.integers(0, VOCAB, size))
        (export / "tokenizers").mkdir(exist_ok=True)
        for suffix in (".model", ".vocab"):
            vocab = variant.removeprefix("sp")
            (export / "tokenizers" / f"fineweb_{vocab}_bpe{suffix}").write_bytes(
                tokenizer.with_suffix(suffix).read_bytes()
            )
    (export / "docs_selected.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    (export / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 1}))

    def entry(variant: str) -> dict:
        stats = {
            "files_val": 1,
            "files_train": len(HUB_TRAIN_SHARDS),
            "tokens_val": HUB_VAL_TOKENS,
            "tokens_train": sum(HUB_TRAIN_SHARDS),
        }
        vocab = int(variant.removeprefix("sp"))
        return {
            "name": f"fineweb10B_{variant}",
            "tokenizer_name": f"sp_bpe_{vocab}",
            "vocab_size": vocab,
            "stats": stats,
        }

    if manifest:
        variants = listed + listed_without_files
        (export / "manifest.json").write_text(
            json.dumps(
                {
                    "version": "10B",
                    "shard_size": HUB_SHARD_SIZE,
                    "datasets": [entry(v) for v in variants],
                    "tokenizers": [
                        {
                            "name": f"sp_bpe_{v[2:]}",
                            "model_path": f"tokenizers/fineweb_{v[2:]}_bpe.model",
                            "vocab_path": f"tokenizers/fineweb_{v[2:]}_bpe.vocab",
                        }
                        for v in variants
                    ],
                }
            )
        )
    return export


@pytest.fixture
def hub(tmp_path, tiny):
    """The challenge's repo with sp384 (and sp8192 listed in its manifest, without files)."""
    _, built = tiny
    root = tmp_path / "hub"
    write_export(
        root / CHALLENGE_REPO,
        built.tokenizer_path,
        listed=(f"sp{VOCAB}",),
        listed_without_files=("sp8192",),
    )
    return root


def hub_config(hub: Path, out_root: Path, **overrides) -> DownloadConfig:
    settings = dict(
        variant=f"sp{VOCAB}", train_shards=2, out_root=out_root, mirror=hub, show_progress=False
    )
    settings.update(overrides)
    return DownloadConfig(**settings)


def local_files(out_root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out_root).as_posix(): p.read_bytes()
        for p in sorted(out_root.rglob("*"))
        if p.is_file()
    }


def test_download_fresh(hub, tmp_path):
    out = tmp_path / "data"
    result = download(hub_config(hub, out))
    export = hub / CHALLENGE_REPO / "datasets"
    shards = f"fineweb10B_sp{VOCAB}"
    expected = {
        f"datasets/manifests/{CHALLENGE_REPO}/datasets/manifest.json": export / "manifest.json",
        f"datasets/{shards}/fineweb_val_000000.bin": export
        / f"datasets/{shards}/fineweb_val_000000.bin",
        f"datasets/{shards}/fineweb_train_000000.bin": export
        / f"datasets/{shards}/fineweb_train_000000.bin",
        f"datasets/{shards}/fineweb_train_000001.bin": export
        / f"datasets/{shards}/fineweb_train_000001.bin",
        f"tokenizers/fineweb_{VOCAB}_bpe.model": export / f"tokenizers/fineweb_{VOCAB}_bpe.model",
        f"tokenizers/fineweb_{VOCAB}_bpe.vocab": export / f"tokenizers/fineweb_{VOCAB}_bpe.vocab",
    }
    manifest = f"datasets/{shards}/manifest.json"  # written here, not fetched
    # and nothing else
    assert local_files(out) == {
        **{rel: path.read_bytes() for rel, path in expected.items()},
        manifest: result.manifest_path.read_bytes(),
    }
    assert result.manifest_path == out / manifest
    tokenizer = (export / f"tokenizers/fineweb_{VOCAB}_bpe.model").read_bytes()
    assert json.loads(result.manifest_path.read_text()) == {
        "name": shards,
        "format": {"header_int32": 256, "magic": SHARD_MAGIC, "version": 1, "token_dtype": "<u2"},
        "bos_id": 1,
        "vocab_size": VOCAB,
        "source": {"kind": "download", "repo_id": CHALLENGE_REPO, "remote_root": "datasets"},
        "tokenizer": {
            "path": f"tokenizers/fineweb_{VOCAB}_bpe.model",
            "sha256": hashlib.sha256(tokenizer).hexdigest(),
            "trained_here": False,
        },
    }
    assert no_temp_leftovers(out)
    assert (result.repo_id, result.remote_root, result.found_in) == (
        CHALLENGE_REPO,
        "datasets",
        "manifest",
    )
    assert result.dataset_dir == out / "datasets" / shards
    assert result.tokenizer_path == out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    assert result.vocab_size == VOCAB
    assert len(result.fetched) == 5 and result.already_complete == []


def test_download_resumes_and_refetches_damaged_files(hub, tmp_path):
    out = tmp_path / "data"
    download(hub_config(hub, out))
    dataset = out / "datasets" / f"fineweb10B_sp{VOCAB}"
    before = {p: p.stat() for p in out.rglob("*") if p.is_file()}

    again = download(hub_config(hub, out))  # nothing to do
    assert again.fetched == [] and len(again.already_complete) == 5
    assert {p: (s.st_ino, s.st_mtime_ns) for p, s in before.items()} == {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before
    }

    partial = dataset / "fineweb_train_000001.bin"
    partial.write_bytes(partial.read_bytes()[:1500])  # an interrupted copy
    wrong_magic = dataset / "fineweb_val_000000.bin"
    data = bytearray(wrong_magic.read_bytes())
    data[0:4] = (12345).to_bytes(4, "little")
    wrong_magic.write_bytes(bytes(data))
    other = dataset / "fineweb_train_000000.bin"
    other_stat = other.stat()

    repaired = download(hub_config(hub, out, train_shards=3))
    assert sorted(p.name for p in repaired.fetched) == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
    ]
    assert (other.stat().st_ino, other.stat().st_mtime_ns) == (
        other_stat.st_ino,
        other_stat.st_mtime_ns,
    )
    for path in shard_paths(dataset, "val") + shard_paths(dataset, "train"):
        assert (
            path.read_bytes()
            == (
                hub / CHALLENGE_REPO / "datasets" / "datasets" / dataset.name / path.name
            ).read_bytes()
        )
    assert no_temp_leftovers(out)


def test_download_checks_token_counts_against_the_manifest(hub, tmp_path):
    remote = (
        hub
        / CHALLENGE_REPO
        / "datasets"
        / "datasets"
        / f"fineweb10B_sp{VOCAB}"
        / "fineweb_train_000000.bin"
    )
    # well-formed, but the manifest implies 1000 tokens
    write_shard(remote, np.zeros(999, dtype=np.uint16))
    out = tmp_path / "data"
    with pytest.raises(
        DownloadError,
        match="fineweb_train_000000.bin is not valid: .*999 tokens, the manifest implies 1000",
    ):
        download(hub_config(hub, out))
    assert not (out / "datasets" / f"fineweb10B_sp{VOCAB}" / "fineweb_train_000000.bin").exists()
    assert no_temp_leftovers(out)


def test_download_with_docs_and_errors(hub, tmp_path):
    out = tmp_path / "data"
    download(hub_config(hub, out, train_shards=0, with_docs=True))
    assert (out / "datasets" / "docs_selected.jsonl").read_bytes() == (
        hub / CHALLENGE_REPO / "datasets" / "docs_selected.jsonl"
    ).read_bytes()
    assert shard_paths(out / "datasets" / f"fineweb10B_sp{VOCAB}", "train") == []

    with pytest.raises(DownloadError, match="has 3 training shards, --train-shards asks for 4"):
        download(hub_config(hub, out, train_shards=4))
    # Listed in the manifest, but the repo lacks its files.
    with pytest.raises(
        DownloadError, match=r"fineweb10B_sp8192/fineweb_val_000000.bin is not in the mirror"
    ):
        download(hub_config(hub, out, variant="sp8192", repo_id=CHALLENGE_REPO))
    # sp8192 is published elsewhere: this mirror holds no copy of that repo.
    with pytest.raises(
        DownloadError, match=f"has no copy of {RECORDS_REPO} .*it holds: {CHALLENGE_REPO} "
    ):
        download(hub_config(hub, out, variant="sp8192"))
    with pytest.raises(
        DownloadError,
        match="variant 'sp384' is not in .*folder other_root/.*no manifest.json, and its files "
        "hold no variant",
    ):
        download(hub_config(hub, tmp_path / "elsewhere", remote_root="other_root"))


def test_download_missing_variant_names_what_exists(hub, tmp_path):
    with pytest.raises(DownloadError) as err:
        download(hub_config(hub, tmp_path / "data", variant="sp999"))
    message = str(err.value)
    assert f"variant 'sp999' is not in mirror {hub / CHALLENGE_REPO} (folder datasets/)" in message
    assert f"its manifest lists sp{VOCAB}, sp8192, and its files hold sp{VOCAB}" in message
    assert f"sp1024 in {CHALLENGE_REPO}; sp4096, sp8192 in {RECORDS_REPO}" in message
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp999").exists()


@pytest.mark.parametrize(
    "variant", ["byte260", "sp8192_lossless_caps_caseops_v1_reserved", "SP1024"]
)
def test_download_refuses_variants_the_trainer_cannot_score(hub, tmp_path, variant):
    with pytest.raises(
        DownloadError,
        match=f"--variant {variant}: train_gpt.py counts bytes from SentencePiece pieces",
    ):
        download(hub_config(hub, tmp_path / "data", variant=variant, repo_id=CHALLENGE_REPO))
    assert not (tmp_path / "data").exists()


@pytest.fixture
def two_repos(tmp_path, tiny):
    """The challenge's repo (sp1024 in its manifest) and the records' repo, whose manifest lists
    sp8192 only while its files hold sp4096 too (each export run wrote a manifest of its own
    variants)."""
    _, built = tiny
    root = tmp_path / "hub"
    write_export(root / CHALLENGE_REPO, built.tokenizer_path, listed=("sp1024",))
    write_export(
        root / RECORDS_REPO, built.tokenizer_path, listed=("sp8192",), unlisted=("sp4096",)
    )
    return root


@pytest.mark.parametrize(
    "variant, repo, found_in, expected_tokens",
    [
        ("sp1024", CHALLENGE_REPO, "manifest", True),
        ("sp8192", RECORDS_REPO, "manifest", True),
        ("sp4096", RECORDS_REPO, "file listing", False),
    ],
)
def test_download_reads_each_variant_from_the_repo_that_publishes_it(
    two_repos, tmp_path, variant, repo, found_in, expected_tokens
):
    result = download(hub_config(two_repos, tmp_path / "data", variant=variant, train_shards=3))
    assert (result.repo_id, result.found_in) == (repo, found_in)
    remote = two_repos / repo / "datasets"
    dataset = tmp_path / "data" / "datasets" / f"fineweb10B_{variant}"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
        "manifest.json",
    ]
    for path in dataset.glob("*.bin"):
        assert path.read_bytes() == (remote / "datasets" / dataset.name / path.name).read_bytes()
    assert json.loads(result.manifest_path.read_text())["source"]["repo_id"] == repo
    vocab = variant.removeprefix("sp")
    assert result.tokenizer_path == tmp_path / "data" / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    assert (
        result.tokenizer_path.with_suffix(".vocab").read_bytes()
        == (remote / f"tokenizers/fineweb_{vocab}_bpe.vocab").read_bytes()
    )
    # Shard sizes are checked against the manifest when it lists the variant; a listing gives none.
    config = hub_config(two_repos, tmp_path / "again", variant=variant, train_shards=3)
    found = downloader.find_variant(
        downloader.MirrorFetcher(two_repos, repo), config, repo, "datasets"
    )
    planned, _, _ = downloader.plan_downloads(found, config, "datasets")
    shards = [item for item in planned if item.local_path.suffix == ".bin"]
    assert [item.expected_tokens for item in shards] == (
        [HUB_VAL_TOKENS, *HUB_TRAIN_SHARDS] if expected_tokens else [None] * 4
    )


def test_download_repo_and_root_overrides(two_repos, tmp_path, monkeypatch, capsys):
    write_export(
        two_repos / "someone/export",
        two_repos / RECORDS_REPO / "datasets/tokenizers/fineweb_8192_bpe.model",
        listed=("sp8192",),
        root="v2",
    )
    out = tmp_path / "data"
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/export")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "v2")
    assert (
        downloader.main(
            [
                "--variant",
                "sp8192",
                "1",
                "--mirror",
                str(two_repos),
                "--out-root",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "source: someone/export folder v2/ (files from its manifest)" in printed
    assert (out / "datasets/manifests/someone/export/v2/manifest.json").is_file()
    # The flags win over the environment (into another folder: two exports never mix in one).
    assert (
        downloader.main(
            [
                "--variant",
                "sp8192",
                "0",
                "--mirror",
                str(two_repos),
                "--out-root",
                str(tmp_path / "records_data"),
                "--repo-id",
                RECORDS_REPO,
                "--remote-root",
                "datasets",
            ]
        )
        == 0
    )
    assert f"source: {RECORDS_REPO} folder datasets/" in capsys.readouterr().out
    with pytest.raises(DownloadError, match="repo id 'nobody' is not of the form owner/name"):
        download(hub_config(two_repos, out, variant="sp8192", repo_id="nobody"))
    with pytest.raises(DownloadError, match=r"remote root '\.\./up' is not a plain folder path"):
        download(hub_config(two_repos, out, variant="sp8192", remote_root="../up"))


def test_download_fetches_a_stale_manifest_again(two_repos, tmp_path):
    out = tmp_path / "data"
    cache = out / "datasets" / "manifests" / RECORDS_REPO / "datasets" / "manifest.json"
    cache.parent.mkdir(parents=True)
    # fetched before sp8192 was published
    cache.write_text(json.dumps({"datasets": [], "tokenizers": []}))
    result = download(hub_config(two_repos, out, variant="sp8192", train_shards=0))
    assert result.found_in == "manifest"
    assert (
        cache.read_bytes() == (two_repos / RECORDS_REPO / "datasets" / "manifest.json").read_bytes()
    )


def test_download_listing_errors(two_repos, tmp_path):
    shards = two_repos / RECORDS_REPO / "datasets" / "datasets" / "fineweb10B_sp4096"
    (shards / "fineweb_train_000001.bin").unlink()
    with pytest.raises(
        DownloadError, match="lists 2 train shards but not fineweb_train_000001.bin"
    ):
        download(hub_config(two_repos, tmp_path / "data", variant="sp4096"))
    (shards / "fineweb_train_000002.bin").unlink()
    (two_repos / RECORDS_REPO / "datasets" / "tokenizers" / "fineweb_4096_bpe.model").unlink()
    with pytest.raises(
        DownloadError,
        match="no tokenizer datasets/tokenizers/fineweb_4096_bpe.model beside it "
        r"\(the repo's tokenizers: datasets/tokenizers/fineweb_8192_bpe.model\)",
    ):
        download(hub_config(two_repos, tmp_path / "data", variant="sp4096", train_shards=1))


def test_download_refuses_unsafe_names_in_a_manifest(hub, tmp_path):
    manifest_path = hub / CHALLENGE_REPO / "datasets" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["datasets"][0]["name"] = f"../../outside_sp{VOCAB}"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DownloadError, match="unsafe dataset folder '../../outside_sp384'"):
        download(hub_config(hub, tmp_path / "data"))
    manifest["datasets"][0]["name"] = f"fineweb10B_sp{VOCAB}"
    manifest["tokenizers"][0]["model_path"] = "tokenizers/../../../outside.model"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DownloadError, match="unsafe tokenizer path"):
        download(hub_config(hub, tmp_path / "data"))
    assert not list(tmp_path.rglob("outside*"))


def test_download_leaves_a_built_dataset_alone(two_repos, tmp_path):
    out = tmp_path / "data"
    built = out / "datasets" / "fineweb10B_sp8192"
    built.mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    with pytest.raises(DownloadError, match="holds a dataset built by build_dataset.py"):
        download(hub_config(two_repos, out, variant="sp8192"))
    assert [p.name for p in built.iterdir()] == ["manifest.json"]


def test_download_keeps_a_dataset_manifest_that_says_otherwise(two_repos, tmp_path, tiny_data):
    out = tmp_path / "data"
    first = download(hub_config(two_repos, out, variant="sp8192", train_shards=1))
    manifest = first.manifest_path.read_bytes()
    # More shards of the same source: the manifest stays as it is.
    assert (
        download(hub_config(two_repos, out, variant="sp8192")).manifest_path == first.manifest_path
    )
    assert first.manifest_path.read_bytes() == manifest
    # Another export of sp8192 into the same folder: refused before a shard is fetched (only its
    # repo's manifest is, to find the variant).
    write_export(
        two_repos / "someone/export",
        Path(tiny_data["tokenizer_path"]),
        listed=("sp8192",),
        root="v2",
    )
    before = local_files(out / "datasets" / "fineweb10B_sp8192") | local_files(out / "tokenizers")
    with pytest.raises(
        DownloadError,
        match=f"fineweb10B_sp8192 holds shards downloaded from {RECORDS_REPO} folder datasets/ "
        r"\(its manifest.json says so\); downloading someone/export folder v2/ into it would mix",
    ):
        download(
            hub_config(two_repos, out, variant="sp8192", repo_id="someone/export", remote_root="v2")
        )
    assert (
        local_files(out / "datasets/fineweb10B_sp8192") | local_files(out / "tokenizers") == before
    )
    # The tokenizer replaced by another of the same size: the manifest is kept, and the run says so.
    first.tokenizer_path.write_bytes(Path(tiny_data["tokenizer_path"]).read_bytes())
    with pytest.raises(
        DownloadError,
        match=r"manifest.json disagrees with this download in tokenizer, so it is kept: if "
        r".*fineweb_8192_bpe.model was replaced since",
    ):
        download(hub_config(two_repos, out, variant="sp8192"))
    assert first.manifest_path.read_bytes() == manifest
    first.tokenizer_path.unlink()  # as the message says: fetched again, and the manifest agrees
    download(hub_config(two_repos, out, variant="sp8192"))
    assert first.manifest_path.read_bytes() == manifest


def test_the_trainer_checks_the_tokenizer_of_a_download_against_its_manifest(
    hub, tmp_path, tiny_data
):
    """train_gpt.py's load_tokenizer on a downloaded folder: the tokenizer the manifest names is
    taken (the fake export's shards hold random ids, which the check without a manifest, a round
    trip of the validation documents, refuses for any tokenizer), another one of the same size
    is refused."""
    import train_gpt as tg

    result = download(hub_config(hub, tmp_path / "data"))
    env = {
        "DATA_PATH": str(result.dataset_dir),
        "TOKENIZER_PATH": str(result.tokenizer_path),
        "VOCAB_SIZE": str(VOCAB),
    }
    val = tg.load_validation_tokens(str(result.dataset_dir / "fineweb_val_*.bin"), 64, VOCAB)
    sp = tg.load_tokenizer(tg.Hyperparameters.from_env(env), val)
    assert sp.get_piece_size() == VOCAB
    other = tiny_data["tokenizer_path"]
    assert spm.SentencePieceProcessor(model_file=other).get_piece_size() == VOCAB
    want = json.loads(result.manifest_path.read_text())["tokenizer"]["sha256"]
    with pytest.raises(ValueError) as err:
        tg.load_tokenizer(tg.Hyperparameters.from_env({**env, "TOKENIZER_PATH": other}), val)
    message = str(err.value)
    assert f"TOKENIZER_PATH={other} " in message and f"DATA_PATH={result.dataset_dir}" in message
    assert "is not the tokenizer the shards" in message and f"sha256 {want[:12]}" in message


def test_download_cli_with_mirror(hub, tmp_path, capsys):
    out = tmp_path / "data"
    assert (
        downloader.main(
            ["--variant", f"sp{VOCAB}", "1", "--mirror", str(hub), "--out-root", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "files: 4 fetched, 0 already complete" in printed
    assert f"VOCAB_SIZE={VOCAB}" in printed
    assert (
        shard_paths(out / "datasets" / f"fineweb10B_sp{VOCAB}", "train")[-1].name
        == "fineweb_train_000000.bin"
    )


@pytest.mark.parametrize("variant, repo", [("sp1024", CHALLENGE_REPO), ("sp8192", RECORDS_REPO)])
def test_download_offline_gives_one_clear_message(tmp_path, variant, repo):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("MATCHED_FINEWEB_REPO_ID", None)
    env.pop("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(DATA_DIR / "cached_challenge_fineweb.py"),
            "--variant",
            variant,
            "--out-root",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [errors[0]] and errors[0].startswith("error: ")
    assert repo in errors[0] and "HF_HUB_OFFLINE" in errors[0] and "--mirror" in errors[0]
    assert not list((tmp_path / "data").rglob("*.bin"))
