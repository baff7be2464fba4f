"""CPU tests of data/caseops.py (the CaseOps case transform and its byte counts) and of
data/build_dataset.py --caseops (a CaseOps dataset with its validation byte sidecar)."""

from __future__ import annotations

import json
import random
import re
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

# conftest puts data/ on sys.path; test_data has the small-corpus helpers of the builder's tests.
import build_dataset
import caseops
from build_dataset import DatasetError, build
from caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError
from conftest import split_documents, split_tokens
from shard_format import byte_sidecar_paths, read_header, read_shard, shard_paths
from test_data import make_docs, no_temp_leftovers, tiny_config, write_jsonl

MARKER_CHARS = "".join(caseops.MARKERS.values())

# Strings that a case transform gets wrong: markers and a lone escape in the input, letters whose
# case does not round-trip (ǅ, İ, ß, ẞ, ﬀ, the Kelvin sign), emoji, empty and capital-only text.
HOSTILE = [
    "",
    "A",
    "NASA",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "iPhone",
    "McDONALD's",
    "The NASA Launch",
    "ǅ ǅemal Ǆ ǆ",
    "İstanbul İ ı I i",
    "ß ẞ STRASSE Straße",
    "ﬀ ﬁ ﬃ ＡＢＣ ½ ① ㎒",
    "Ärger ÉCOLE École éCOLE Σίσυφος ΣΊΣΥΦΟΣ",
    "\u212a Kelvin \u212b",
    "😀 🦜 👩‍👩‍👧 x😀Y",
    ESC,
    ESC + "A",
    TITLE + ALLCAPS + CAPNEXT + ESC,
    ESC * 5 + "Ab" + TITLE,
    "\ue000 \ue005 \uf8ff private use",
    "mixed9Words 4TH 2nd R2D2 x86_64 A1B2",
    "  leading and trailing  \n\t",
    "  The leading capital",
    "tabs\tand\r\nCRLF\x00NUL\x01",
]

# What the records' encoder (`encode_lossless_caps_v2` of their lossless_caps.py) gives.
RECORD_ENCODINGS = {
    "The NASA Launch": f"{TITLE}the {ALLCAPS}nasa {TITLE}launch",
    "iPhone": f"i{CAPNEXT}phone",
    "McDONALD's": f"{TITLE}mc{CAPNEXT}d{CAPNEXT}o{CAPNEXT}n{CAPNEXT}a{CAPNEXT}l{CAPNEXT}d's",
    "A": f"{TITLE}a",
    "ÉCOLE Ärger": f"É{ALLCAPS}cole Ärger",
    "R2D2 4TH": f"{TITLE}r2{TITLE}d2 4{ALLCAPS}th",
    f"x{TITLE}Y{ESC}": f"x{ESC}{TITLE}{TITLE}y{ESC}{ESC}",
}


def random_texts(count: int, seed: int) -> list[str]:
    """Random mixes of ASCII letters in every case, Unicode letters whose case changes or does not
    round-trip, digits, punctuation, whitespace, emoji, the markers, and any code point."""
    rng = random.Random(seed)
    pools = [
        "abcxyzABCXYZ",
        "ÄäÉéÖößẞİıǅǄǆΣσςΆάКкﬀﬁ\u212a",
        "0123456789",
        " \t\n\r.,;:'\"-_()!?/",
        "😀🦜\u200d",
        MARKER_CHARS + "\ue000\ue005",
    ]
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.05:
                code = rng.randint(0, 0x10FFFF)
                chars.append(chr(code) if not 0xD800 <= code < 0xE000 else "a")
            else:
                chars.append(rng.choice(rng.choice(pools)))
        texts.append("".join(chars))
    return texts


def active_markers(encoded: str) -> list[tuple[int, str]]:
    """(position, marker) of each marker of an encoded text that acts as one (not an escaped
    literal), read one character at a time."""
    found = []
    i = 0
    while i < len(encoded):
        if encoded[i] in MARKER_CHARS:
            found.append((i, encoded[i]))
            i += 2 if encoded[i] == ESC else 1
        else:
            i += 1
    return found


# -----------------------------------------------------------------------------
# The transform


def check_round_trip(text: str) -> None:
    encoded = caseops.encode(text)
    assert caseops.decode(encoded).encode("utf-8") == text.encode("utf-8"), text
    assert not re.search("[A-Z]", encoded)  # every ASCII capital became a marker
    # Each character keeps its UTF-8 length, so the markers are the only extra bytes.
    weights = caseops.original_byte_weights(encoded.encode("utf-8"))
    assert int(weights.sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", HOSTILE)
def test_round_trip_hostile(text):
    check_round_trip(text)


def test_round_trip_random():
    for text in random_texts(5000, seed=0):
        check_round_trip(text)


def test_the_rules_are_the_records():
    for text, encoded in RECORD_ENCODINGS.items():
        assert caseops.encode(text) == encoded
    # Letters outside ASCII are never changed, whatever their case does.
    for text in ["ǅ İ ı ß ẞ ﬀ Ä É ÄÖÜ Σίσυφος ΣΊΣΥΦΟΣ \u212a", "😀", "", "1234 ,.!"]:
        assert caseops.encode(text) == text
    assert caseops.SCHEME == "lossless_caps_caseops_v1"
    assert caseops.MARKERS == {
        "TITLE": "\ue001",
        "ALLCAPS": "\ue002",
        "CAPNEXT": "\ue003",
        "ESC": "\ue004",
    }


def test_markers_never_collide_with_text():
    for text in HOSTILE + random_texts(2000, seed=1):
        encoded = caseops.encode(text)
        markers = active_markers(encoded)
        # Each marker character of the input is escaped: one ESC each, no other ESC.
        assert [m for _, m in markers].count(ESC) == sum(text.count(m) for m in MARKER_CHARS)
        # Every other marker stands for capitals: TITLE and CAPNEXT for the next letter, ALLCAPS
        # for the whole next word; together, exactly the text's ASCII capitals.
        marked = 0
        for position, marker in markers:
            if marker == ALLCAPS:
                marked += len(re.match("[a-z]+", encoded[position + 1 :]).group())
            elif marker != ESC:
                assert re.match("[a-z]", encoded[position + 1 :])
                marked += 1
        assert marked == len(re.findall("[A-Z]", text)), text
        # Without its escapes and markers, the encoding is the text with ASCII capitals lowered.
        stripped = re.sub(f"{ESC}(.)|[{TITLE}{ALLCAPS}{CAPNEXT}]", r"\1", encoded, flags=re.DOTALL)
        assert stripped == re.sub("[A-Z]", lambda m: m.group().lower(), text)


@pytest.mark.parametrize(
    "bad, where",
    [
        (ESC, "ESC"),
        (f"a{ESC}b", "ESC"),
        (f"x{TITLE}", "TITLE"),
        (f"{TITLE}1", "TITLE"),
        (f"{ALLCAPS} nasa", "ALLCAPS"),
        (f"{CAPNEXT}{CAPNEXT}a", "CAPNEXT"),
        (f"{TITLE}A", "TITLE"),
    ],
)
def test_decode_rejects_what_encode_never_writes(bad, where):
    with pytest.raises(CaseOpsError, match=where):
        caseops.decode(bad)


def test_a_stray_escape_is_not_counted_as_text():
    with pytest.raises(CaseOpsError, match="ESC"):
        caseops.original_byte_weights(f"a{ESC}b".encode())


# -----------------------------------------------------------------------------
# Byte counts of tokens


def test_token_byte_counts_cover_the_text_exactly():
    rng = random.Random(2)
    for text in HOSTILE + random_texts(500, seed=3):
        encoded = caseops.encode(text)
        size = len(encoded.encode("utf-8"))
        # Any tokens: cuts at any byte (inside characters too), empty tokens, gaps before the
        # first token and after the last, as a tokenizer's normalizer leaves them.
        cuts = sorted(rng.randint(0, size) for _ in range(rng.randint(1, 12)))
        begins = cuts[:-1] if len(cuts) > 1 else cuts
        offsets = [(b, b) for b in begins]
        counts = caseops.token_byte_counts(encoded, offsets)
        assert counts.shape == (len(offsets),) and counts.min() >= 0
        assert int(counts.sum()) == len(text.encode("utf-8")), text


def test_token_byte_counts_rules():
    encoded = caseops.encode("  The ½")  # "  " TITLE "the ½", "½" is 2 bytes
    data = encoded.encode()
    title = data.index(TITLE.encode())
    half = data.index("½".encode())
    # As the tokenizer cuts it: no token for the leading spaces (its normalizer drops them),
    # TITLE, "the ", then the five tokens NFKC makes of "½" ("1", the 3 bytes of "⁄", "2"), all
    # beginning at "½".
    offsets = [(title, title + 3), (title + 3, half)] + [(half, half)] * 4 + [(half, half + 2)]
    counts = caseops.token_byte_counts(encoded, offsets).tolist()
    # The marker stands for nothing: the leading spaces count for the first token after it.
    assert counts == [0, 2 + 4, 1, 1, 0, 0, 0]
    # Three byte pieces of one 3-byte character: one byte each.
    encoded = "x€"
    counts = caseops.token_byte_counts(encoded, [(0, 1), (1, 1), (1, 1), (1, 4)]).tolist()
    assert counts == [1, 1, 1, 1]
    # An escaped marker is text: 3 bytes; its ESC none.
    encoded = caseops.encode(TITLE)
    assert caseops.token_byte_counts(encoded, [(0, 3), (3, 6)]).tolist() == [0, 3]
    assert caseops.token_byte_counts("", []).tolist() == []
    with pytest.raises(ValueError, match="in order"):
        caseops.token_byte_counts("abc", [(2, 3), (0, 2)])


@pytest.fixture(scope="module")
def pydocs_caseops(tmp_path_factory):
    """A --caseops build of the builder's own corpus (a few hundred documents), through the CLI,
    with small shards so that the validation split and its sidecar span several files."""
    out_root = tmp_path_factory.mktemp("caseops") / "out"
    argv = ["--caseops", "--out-root", str(out_root), "--max-bytes", "1000000"]
    argv += ["--val-docs", "40", "--vocab-size", "512", "--min-tokens", "64"]
    argv += ["--shard-tokens", "20000", "--no-progress"]
    assert build_dataset.main(argv) == 0
    docs, _ = build_dataset.collect_pydocs(max_bytes=1_000_000, workers=2, show_progress=False)
    dataset_dir = out_root / "datasets" / "pydocs_caseops_sp512"
    return {
        "docs": docs,
        "out_root": out_root,
        "dataset_dir": dataset_dir,
        "tokenizer": out_root / "tokenizers" / "pydocs_caseops_512_bpe.model",
        "manifest": json.loads((dataset_dir / "manifest.json").read_text()),
    }


def acting_markers(tokens: np.ndarray, marker_ids: dict[str, int]) -> np.ndarray:
    """Which tokens are markers at work (a marker token after an ESC at work is a literal)."""
    acting = np.zeros(tokens.size, dtype=bool)
    escaped = False
    for i, token in enumerate(tokens.tolist()):
        acting[i] = token in marker_ids.values() and not escaped
        escaped = acting[i] and token == marker_ids["ESC"]
    return acting


def sidecar_of(dataset_dir) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in byte_sidecar_paths(dataset_dir)])


def test_tokenizer_holds_the_markers_as_pieces(pydocs_caseops):
    sp = spm.SentencePieceProcessor(model_file=str(pydocs_caseops["tokenizer"]))
    assert sp.vocab_size() == 512
    # The records' tokenizer has the same ids for them.
    ids = {name: sp.piece_to_id(m) for name, m in caseops.MARKERS.items()}
    assert ids == {"TITLE": 4, "ALLCAPS": 5, "CAPNEXT": 6, "ESC": 7}
    assert build_dataset.caseops_marker_ids(sp) == ids
    for marker in caseops.MARKERS.values():
        assert sp.encode(f"ab{marker}cd{marker}{marker}").count(sp.piece_to_id(marker)) == 3
    assert pydocs_caseops["manifest"]["tokenizer"]["settings"]["user_defined_symbols"] == [
        TITLE,
        ALLCAPS,
        CAPNEXT,
        ESC,
    ]


def test_caseops_build_shards_and_sidecar(pydocs_caseops):
    dataset_dir, docs = pydocs_caseops["dataset_dir"], pydocs_caseops["docs"]
    manifest = pydocs_caseops["manifest"]
    sp = spm.SentencePieceProcessor(model_file=str(pydocs_caseops["tokenizer"]))
    val_docs, train_docs = docs[:40], docs[40:]

    # The shards hold [BOS] + the tokens of each document's CaseOps form.
    val = split_tokens(dataset_dir, "val")
    assert split_documents(val) == [sp.encode(caseops.encode(d)) for d in val_docs]
    assert split_documents(split_tokens(dataset_dir, "train")) == [
        sp.encode(caseops.encode(d)) for d in train_docs
    ]

    # One sidecar beside each validation shard, the same format and length; none for training.
    shards, sidecars = shard_paths(dataset_dir, "val"), byte_sidecar_paths(dataset_dir)
    assert len(shards) > 2
    assert [p.name for p in sidecars] == [
        f"fineweb_val_bytes_{i:06d}.bin" for i in range(len(shards))
    ]
    assert [read_header(p) for p in sidecars] == [read_header(p) for p in shards]
    assert not list(dataset_dir.glob("fineweb_train_bytes_*"))
    counts = sidecar_of(dataset_dir)
    assert counts.shape == val.shape

    # Per document: BOS 0, the markers 0, every other token at least 1, the sum its length.
    marker_ids = manifest["caseops"]["marker_ids"]
    starts = np.flatnonzero(val == 1).tolist() + [val.size]
    for doc, start, end in zip(val_docs, starts[:-1], starts[1:], strict=True):
        doc_counts, doc_tokens = counts[start:end], val[start:end]
        assert doc_counts[0] == 0
        assert int(doc_counts.sum()) == len(doc.encode("utf-8"))
        is_marker = acting_markers(doc_tokens[1:], marker_ids)
        assert is_marker.any()
        assert not doc_counts[1:][is_marker].any()
        assert doc_counts[1:][~is_marker].min() >= 1

    # The manifest says what it is and where the bytes are.
    assert manifest["text_transform"] == "caseops"
    assert manifest["caseops"]["scheme"] == "lossless_caps_caseops_v1"
    assert manifest["caseops"]["markers"] == {
        "TITLE": "U+E001",
        "ALLCAPS": "U+E002",
        "CAPNEXT": "U+E003",
        "ESC": "U+E004",
    }
    sidecar = manifest["caseops"]["byte_sidecar"]
    assert sidecar["files"] == [
        {"name": p.name, "tokens": read_header(p), "bytes": int(np.asarray(read_shard(p)).sum())}
        for p in sidecars
    ]
    raw_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    assert sidecar["bytes_total"] == manifest["stats"]["bytes_val"] == raw_bytes
    assert manifest["caseops"]["val_docs_without_tokens"] == 0
    assert {f["name"] for f in manifest["files"]} == {
        p.name for p in shard_paths(dataset_dir, "val") + shard_paths(dataset_dir, "train")
    }
    assert no_temp_leftovers(pydocs_caseops["out_root"])


def test_caseops_build_of_hostile_documents(tmp_path, pydocs_caseops):
    """Reusing the CaseOps tokenizer on documents made to break it: markers in the text, letters
    whose case does not round-trip, NFKC-folded characters, whitespace the tokenizer drops."""
    hostile = [d for d in HOSTILE if d] + ["   \n  ", "", "\ufdfa"]
    docs = hostile + make_docs(40, seed=7)
    val_docs = len(hostile) + 3
    corpus = write_jsonl(tmp_path / "hostile.jsonl", docs)
    tokenizer = pydocs_caseops["tokenizer"]
    config = tiny_config(
        corpus,
        tmp_path / "out",
        caseops=True,
        tokenizer=tokenizer,
        vocab_size=None,
        val_docs=val_docs,
    )
    result = build(config)
    assert result.dataset_dir.name == "hostile_caseops_sp512"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    val = split_tokens(result.dataset_dir, "val")
    counts = sidecar_of(result.dataset_dir)
    assert counts.shape == val.shape
    starts = np.flatnonzero(val == 1).tolist() + [val.size]
    marker_ids = build_dataset.caseops_marker_ids(sp)
    escaped_literals = 0
    for doc, start, end in zip(docs[:val_docs], starts[:-1], starts[1:], strict=True):
        doc_counts, doc_tokens = counts[start:end], val[start:end]
        assert doc_tokens[1:].tolist() == sp.encode(caseops.encode(doc))
        if end - start == 1:  # only whitespace: the tokenizer gives no token to carry its bytes
            assert not doc.strip() and doc_counts.tolist() == [0]
            continue
        assert int(doc_counts.sum()) == len(doc.encode("utf-8")), doc
        is_marker = acting_markers(doc_tokens[1:], marker_ids)
        assert not doc_counts[1:][is_marker].any()
        # A marker character of the text is a token of 3 bytes after its ESC.
        literal = np.isin(doc_tokens[1:], list(marker_ids.values())) & ~is_marker
        assert (doc_counts[1:][literal] == 3).all()
        escaped_literals += int(literal.sum())
        # A token stands for at least a byte, unless NFKC made more tokens of a character than it
        # has bytes ("ǅ": 2 bytes, "Dž" 3 byte pieces; "½": 2 bytes, "1⁄2").
        if all(len(unicodedata.normalize("NFKC", c).encode()) <= len(c.encode()) for c in doc):
            assert doc_counts[1:][~is_marker].min() >= 1, doc
    assert escaped_literals == sum(d.count(m) for d in docs[:val_docs] for m in MARKER_CHARS)
    manifest = result.manifest
    assert manifest["caseops"]["val_docs_without_tokens"] == 2
    assert manifest["caseops"]["byte_sidecar"]["bytes_total"] == manifest["stats"]["bytes_val"] - 6
    assert manifest["tokenizer"]["trained_here"] is False


def test_caseops_refusals(tmp_path, pydocs_caseops):
    corpus = write_jsonl(tmp_path / "docs.jsonl", make_docs(40, seed=8))
    plain = build(tiny_config(corpus, tmp_path / "out"))
    assert "text_transform" not in plain.manifest and "caseops" not in plain.manifest
    assert not byte_sidecar_paths(plain.dataset_dir)
    # A plain tokenizer cannot encode CaseOps text, nor a CaseOps tokenizer plain text.
    with pytest.raises(DatasetError, match="does not hold the CaseOps markers"):
        build(
            tiny_config(
                corpus,
                tmp_path / "out",
                caseops=True,
                tokenizer=plain.tokenizer_path,
                vocab_size=None,
            )
        )
    with pytest.raises(DatasetError, match="is a CaseOps tokenizer .* pass --caseops"):
        build(
            tiny_config(
                corpus,
                tmp_path / "out",
                name="again",
                tokenizer=pydocs_caseops["tokenizer"],
                vocab_size=None,
            )
        )
    with pytest.raises(DatasetError, match="must exceed 264"):
        build(tiny_config(corpus, tmp_path / "out", caseops=True, vocab_size=264))
    # The CaseOps build of a corpus sits beside its plain build, and is never replaced unforced.
    first = build(tiny_config(corpus, tmp_path / "out", caseops=True))
    assert first.dataset_dir.name == f"docs_caseops_sp{plain.vocab_size}"
    assert first.tokenizer_path.name == f"docs_caseops_{plain.vocab_size}_bpe.model"
    assert plain.dataset_dir.is_dir() and plain.tokenizer_path.is_file()
    with pytest.raises(DatasetError, match="already exists"):
        build(tiny_config(corpus, tmp_path / "out", caseops=True))
    assert no_temp_leftovers(tmp_path / "out")


def test_the_trainer_refuses_caseops_data_until_it_scores_on_the_sidecar(pydocs_caseops):
    """train_gpt.py counts bytes from the tokenizer's pieces: on CaseOps data that would charge the
    markers and miss the capitals, and its validation glob would read the sidecar as tokens."""
    import train_gpt as tg

    pattern = str(pydocs_caseops["dataset_dir"] / "fineweb_val_*.bin")
    with pytest.raises(
        ValueError, match=r"fineweb_val_bytes_000000\.bin: CaseOps data, not scored"
    ):
        tg.load_validation_tokens(pattern, 64, 512)
