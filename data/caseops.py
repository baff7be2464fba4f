"""CaseOps: a lossless case transform of text, applied before SentencePiece.

A tokenizer then learns one piece for "the", "The" and "THE" and spends a marker token on the
case, as the challenge's records from 1.0678 to 1.0611 do. The rules are theirs
(`lossless_caps_caseops_v1` in their `lossless_caps.py`), so `encode` gives the same string as
their encoder for every input, and a tokenizer or dataset made with either works with the other:

- A word is a maximal run of ASCII letters A-Z, a-z. Other characters, non-ASCII letters
  included, are never changed: `Ärger`, `ÉCOLE`, Greek, `ß`/`ẞ`, `İ`, `ǅ` keep their case, so no
  letter whose lower or upper case does not give it back can be damaged. A digit, an apostrophe
  or a non-ASCII letter ends a word: `McDONALD's` is the words `McDONALD` and `s`.
- A lower-case word stays as it is; a word of two or more capitals becomes ALLCAPS + the word in
  lower case; a capital followed by lower-case letters (or a single capital) becomes TITLE + the
  word in lower case; any other word is written in lower case, with TITLE before it when its
  first letter is a capital and CAPNEXT before each later capital:
  `The NASA Launch` -> TITLE `the ` ALLCAPS `nasa ` TITLE `launch`,
  `iPhone` -> `i` CAPNEXT `phone`, `McDONALD` -> TITLE `mc` CAPNEXT `d` CAPNEXT `o` ...
- The four markers are private-use code points (TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003,
  ESC U+E004). One of them that occurs in the text is kept as ESC + itself, so a marker in the
  output is always a marker and `decode(encode(text)) == text` for every string.

The score stays on the original text: each token of the transformed text is given the number of
the original text's UTF-8 bytes it stands for (`token_byte_counts`), which the dataset builder
writes beside the validation shards (the byte sidecar). Under these rules every character keeps
its UTF-8 length (ASCII letters are one byte in either case), so a marker stands for 0 bytes and
every other character for its own bytes; an escaped marker stands for its 3 bytes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TITLE = "\ue001"  # the next letter is a capital
ALLCAPS = "\ue002"  # the whole next word is in capitals
CAPNEXT = "\ue003"  # the next letter (inside a word) is a capital
ESC = "\ue004"  # the next character is a literal marker character, not a marker
MARKERS = {"TITLE": TITLE, "ALLCAPS": ALLCAPS, "CAPNEXT": CAPNEXT, "ESC": ESC}
# The name of these rules in the records' manifests and code.
SCHEME = "lossless_caps_caseops_v1"

_MARKER_CHARS = frozenset(MARKERS.values())
_MARKER_CLASS = f"[{TITLE}{ALLCAPS}{CAPNEXT}{ESC}]"
# A word holding a capital (starting where a run of letters starts), or a marker character.
# Lower-case words need no change, so most of the text is skipped by the regex engine.
_TO_ENCODE = re.compile(f"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|{_MARKER_CLASS}")
# An escaped marker, an ALLCAPS word, a capital letter, or a marker with nothing valid after it.
_TO_DECODE = re.compile(
    f"{ESC}({_MARKER_CLASS})|{ALLCAPS}([a-z]+)|[{TITLE}{CAPNEXT}]([a-z])|({_MARKER_CLASS})"
)
# The same in UTF-8 (every marker is EE 80 8x): an escape and the character it escapes, or a
# marker. Only the first three bytes of a match are a marker: they stand for no original byte.
_MARKER_BYTES = re.compile(rb"\xee\x80\x84\xee\x80[\x81-\x84]|\xee\x80[\x81-\x84]")
_MARKER_UTF8_BYTES = 3
_ESC_BYTES = ESC.encode("utf-8")


class CaseOpsError(ValueError):
    """A text that is not the output of `encode`."""


def _encode_word(match: re.Match) -> str:
    word = match.group()
    if word in _MARKER_CHARS:
        return ESC + word
    lower = word.lower()
    if word.isupper():
        return (ALLCAPS if len(word) > 1 else TITLE) + lower
    if word[0].isupper() and word[1:].islower():
        return TITLE + lower
    head = TITLE + lower[0] if word[0].isupper() else word[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`: capitals as markers + lower case, markers escaped."""
    return _TO_ENCODE.sub(_encode_word, text)


def _decode_match(match: re.Match) -> str:
    escaped, allcaps_word, capital, stray = match.groups()
    if escaped is not None:
        return escaped
    if allcaps_word is not None:
        return allcaps_word.upper()
    if capital is not None:
        return capital.upper()
    what = {v: k for k, v in MARKERS.items()}[stray]
    wants = "a marker character" if stray == ESC else "a lower-case ASCII letter"
    raise CaseOpsError(
        f"{what} (U+{ord(stray):04X}) at character {match.start()} is not followed by {wants}"
    )


def decode(text: str) -> str:
    """The original text of `encode`'s output. Raises CaseOpsError for a marker that is not
    followed by what it applies to (a letter, or for ESC a marker character). A marker placed
    where `encode` would not put it (TITLE inside a word) is still applied."""
    return _TO_DECODE.sub(_decode_match, text)


def original_byte_weights(transformed_utf8: bytes) -> np.ndarray:
    """For each byte of an encoded text's UTF-8, the original bytes it stands for (0 or 1): 0 for
    the bytes of a marker, 1 for every other byte (an escaped marker character included). Their
    sum is the original text's UTF-8 length. Raises CaseOpsError for an ESC that escapes nothing
    (the text was not made by `encode`)."""
    weights = np.ones(len(transformed_utf8), dtype=np.int64)
    for match in _MARKER_BYTES.finditer(transformed_utf8):
        if match.group() == _ESC_BYTES:
            raise CaseOpsError(
                f"ESC (U+E004) at byte {match.start()} is not followed by a marker character"
            )
        weights[match.start() : match.start() + _MARKER_UTF8_BYTES] = 0
    return weights


def token_byte_counts(transformed: str, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """The original UTF-8 bytes each token of an encoded text stands for, exactly.

    `offsets` are the tokens' (begin, end) byte offsets in `transformed`'s UTF-8, as SentencePiece
    reports them (`encode_with_byte_counts`). The ids alone cannot give exact counts: the
    tokenizer normalizes text before it splits it (NFKC turns "ﬀ" into "ff", runs of spaces into
    one), so the pieces' own bytes are not the input's.

    The tokens' ranges are made to cover the text: each runs from its begin to the next token's
    begin (the last to the end of the text), so bytes the normalizer dropped after a token
    (trailing whitespace) count for it, and bytes it dropped before the first token (leading
    whitespace) count for the first token that is not a marker: the counts add up to the original
    text's UTF-8 length. Tokens that begin at the same byte (the byte pieces of one character; the
    pieces NFKC makes of one character, "½" -> "1⁄2") share their bytes as evenly as whole numbers
    allow, the first ones taking one more. So a count is 0 for a marker at work (an escaped marker
    character is text: 3 bytes, its ESC 0), and at least 1 for every other token, except where
    NFKC made more tokens of a character than it has bytes ("ǅ": 2 bytes, "Dž" 3 byte pieces;
    U+FDFA: 3 bytes, 33 tokens). A text with no token (only whitespace) has no count to carry its
    bytes.
    """
    data = transformed.encode("utf-8")
    count = len(offsets)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    begins = np.fromiter((begin for begin, _ in offsets), dtype=np.int64, count=count)
    if begins[0] < 0 or begins[-1] > len(data) or np.any(np.diff(begins) < 0):
        raise ValueError("token offsets must be in order and inside the text")
    bounds = np.append(begins, len(data))  # token i covers bytes bounds[i] to bounds[i + 1]
    cumulative = np.concatenate([[0], np.cumsum(original_byte_weights(data))])
    own = cumulative[bounds[1:]] - cumulative[bounds[:-1]]  # (count,)
    # Tokens that begin where the one before begins form a group; its bytes are the last one's.
    starts_group = np.concatenate([[True], bounds[1:-1] != bounds[:-2]])
    group = np.cumsum(starts_group) - 1  # (count,) group index of each token
    group_start = np.flatnonzero(starts_group)
    group_size = np.diff(np.append(group_start, count))
    share, extra = np.divmod(np.add.reduceat(own, group_start), group_size)
    counts = share[group] + (np.arange(count) - group_start[group] < extra[group])
    if leading := int(cumulative[begins[0]]):
        first_text = np.flatnonzero(counts)  # a marker is always followed by a letter
        counts[first_text[0] if first_text.size else 0] += leading
    return counts


def encode_with_byte_counts(
    sp, transformed_texts: list[str], num_threads: int = 1
) -> list[tuple[list[int], np.ndarray]]:
    """(token ids, original bytes of each token) of each encoded text, with SentencePiece
    processor `sp` (whose tokenizer should hold the markers as single pieces)."""
    try:
        encoded = sp.encode(
            transformed_texts, out_type="offset_mapping", return_bytes=True, num_threads=num_threads
        )
    except (TypeError, ValueError) as exc:  # an older sentencepiece without offset_mapping
        import sentencepiece

        raise RuntimeError(
            f"sentencepiece {sentencepiece.__version__} does not report token offsets "
            f"(out_type='offset_mapping', return_bytes=True: {exc}); install a newer one (0.2.3 "
            "has it)"
        ) from None
    return [
        (item["ids"], token_byte_counts(text, item["offsets"]))
        for text, item in zip(transformed_texts, encoded, strict=True)
    ]
