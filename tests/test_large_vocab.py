"""Vocabularies of 4096 and 8192 pieces end to end: the dataset builder at the records' recipe
(default split, --tokenizer-train-docs), byte counting against SentencePiece's own decode, and
the trainer with MLP_MULT=4 on the result.

The corpus is real text every Python installation carries (stdlib docstrings, as in conftest's
tiny dataset), with a few documents of unusual characters first so that the validation split
holds byte-fallback pieces, normalized characters and runs of spaces.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import (
    ROOT,
    decoded_document_bytes,
    run_script,
    split_documents,
    split_tokens,
    stdlib_documents,
    tiny_env,
)

sys.path.insert(0, str(ROOT / "data"))
import build_dataset  # noqa: E402
from shard_format import shard_paths  # noqa: E402

VOCABS = (4096, 8192)
TOKENIZER_TRAIN_DOCS = 900  # of the corpus' ~1,200 distinct documents
UNUSUAL_DOCS = [
    "Ｆｕｌｌ-width ｌｅｔｔｅｒｓ, ligatures ﬁ ﬂ and ① are folded by NFKC; 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 too.",
    "Emoji 🦜🐍🧪 and rare scripts ᚠᛇᚻ ꦱꦸꦫꦏꦂꦠ fall back to bytes.   "
    "Three spaces,\ttabs,\n\nand blank lines.",
    "  Leading spaces; digits 20240520 and 3.14159; naïve café, Œuvre, Ærø; "
    "∑ ∫ √ → ≤ ≥; 東京 서울 Москва.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    # each text once: splits are disjoint by text too
    docs = list(dict.fromkeys(UNUSUAL_DOCS + stdlib_documents(1500)))
    path = tmp_path_factory.mktemp("large_vocab") / "stdlib.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path, docs


@pytest.fixture(scope="module")
def built(corpus) -> dict[int, build_dataset.BuildResult]:
    path, _ = corpus
    return {
        vocab: build_dataset.build(
            build_dataset.BuildConfig(
                docs=path,
                vocab_size=vocab,
                tokenizer_train_docs=TOKENIZER_TRAIN_DOCS,
                out_root=path.parent / "out",
                shard_tokens=50_000,
                workers=2,
                show_progress=False,
            )
        )
        for vocab in VOCABS
    }


def test_splits_at_vocab_8192(corpus, built):
    _, docs = corpus
    result = built[8192]
    val_docs = build_dataset.default_val_split(
        [len(d.encode()) for d in docs], build_dataset.DEFAULT_MIN_TOKENS
    ).docs
    assert val_docs == len(docs) // 10  # the default for a corpus of fewer than 500,000 documents
    assert result.manifest["val_docs"]["count"] == val_docs
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    assert sp.vocab_size() == 8192
    val = split_documents(split_tokens(result.dataset_dir, "val"))
    train = split_documents(split_tokens(result.dataset_dir, "train"))
    assert val == sp.encode(docs[:val_docs]) and train == sp.encode(docs[val_docs:])
    assert len(shard_paths(result.dataset_dir, "train")) > 1
    assert not {tuple(d) for d in val} & {tuple(d) for d in train}  # no document in both splits
    assert result.manifest["stats"]["tokens_val"] >= build_dataset.DEFAULT_MIN_TOKENS


@pytest.mark.parametrize("vocab", VOCABS)
def test_tokenizer_learns_from_the_training_documents_among_the_first_n(corpus, built, vocab):
    _, docs = corpus
    result = built[vocab]
    val_docs = result.manifest["val_docs"]["count"]
    info = result.manifest["tokenizer"]
    assert info["trained_on_doc_numbers"] == [val_docs + 1, TOKENIZER_TRAIN_DOCS]
    sentences = [
        s
        for doc in docs[val_docs:TOKENIZER_TRAIN_DOCS]
        for s in build_dataset.trainer_sentences(doc)
    ]
    assert result.tokenizer_path.read_bytes() == build_dataset.train_tokenizer(
        sentences, vocab_size=vocab, source="x"
    )


def test_byte_counting_at_vocab_8192_equals_the_decoded_text(built):
    result = built[8192]
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    luts = tg.build_byte_luts(sp, 8192)
    tokens = split_tokens(result.dataset_dir, "val")
    t = torch.from_numpy(tokens.astype(np.int64))
    counted = luts.count(t[:-1], t[1:])
    assert int(counted.sum()) == decoded_document_bytes(sp, tokens)
    # Document by document, so an error cannot cancel out across documents.
    starts = list(np.flatnonzero(tokens == build_dataset.BOS_ID)) + [len(tokens)]
    for a, b in itertools.pairwise(starts):
        assert int(counted[a : b - 1].sum()) == len(
            sp.decode(tokens[a + 1 : b].tolist()).encode("utf-8")
        )
    # What the count must get right occurs: byte fallback, long pieces with a space, multibyte text.
    pieces = [sp.id_to_piece(int(i)) for i in np.unique(tokens)]
    assert any(sp.is_byte(int(i)) for i in np.unique(tokens))
    assert any(p.startswith("▁") and len(p) > 4 for p in pieces)
    assert any(ord(c) > 127 for c in sp.decode(split_documents(tokens)[1]))


@pytest.mark.parametrize("vocab", VOCABS)
def test_the_trainer_runs_at_a_larger_vocabulary_with_mlp_4x(built, tmp_path, vocab):
    result = built[vocab]
    data = {
        "data_path": str(result.dataset_dir),
        "tokenizer_path": str(result.tokenizer_path),
        "vocab_size": vocab,
    }
    env = tiny_env(data, tmp_path, MLP_MULT=4, RUN_ID=f"v{vocab}")
    run_script(env)
    summary = json.loads((tmp_path / "logs" / f"v{vocab}.json").read_text())
    assert (
        summary["hyperparameters"]["VOCAB_SIZE"] == vocab
        and summary["hyperparameters"]["MLP_MULT"] == 4
    )
    log = (tmp_path / "logs" / f"v{vocab}.txt").read_text(encoding="utf-8")
    assert " mlp_mult:4 " in log
    # The model: a (vocab x 64) tied embedding and, per layer, an MLP of 4 x 64 hidden units.
    state = torch.load(tmp_path / "artifacts" / f"v{vocab}_raw.pt", weights_only=True)
    assert tuple(state["tok_emb.weight"].shape) == (vocab, 64)
    assert {tuple(v.shape) for k, v in state.items() if k.startswith("blocks.0.mlp.")} == {
        (256, 64),
        (64, 256),
    }
    # val_bpb: loss per token times tokens per byte, the bytes counted by SentencePiece's decode.
    sp = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    tokens = split_tokens(result.dataset_dir, "val")
    targets, text_bytes = len(tokens) - 1, decoded_document_bytes(sp, tokens)
    assert summary["scored_tokens"] == targets
    for loss, bpb in [
        (summary["roundtrip_val_loss"], summary["roundtrip_val_bpb"]),
        (summary["prequant_val_loss"], summary["prequant_val_bpb"]),
    ]:
        assert math.isfinite(loss) and loss < math.log(vocab) + 1
        assert bpb == pytest.approx(loss / math.log(2) * targets / text_bytes, rel=1e-12)
    assert summary["fits"]
