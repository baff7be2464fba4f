"""Quantization, QAT and the artifact: what is shipped, how it is read back, how its size counts.

quantize_per_row is checked element by element against a slow reference written here; the artifact
against the in-memory export and against damaged or hostile files; QAT against a model whose weights
were quantized by hand, compiled; the size accounting and the run summary against the files a real
tiny run (and a re-export of its raw checkpoint) left on disk.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import lzma
import math
import os
import re
import shutil
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zstandard

import train_gpt as tg
from conftest import ROOT, log_events, run_script, small_hparams, tiny_env

KEEP = "blocks.1.attn.c_k.weight"  # an FP16_KEEP pattern used throughout
RUN_ID = "artifact_run"


# Tiny models in this process run on one thread, like the script runs (OMP_NUM_THREADS=1): threads
# contending over millisecond-sized ops make them many times slower.
pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# Independent references
# -----------------------------------------------------------------------------


def nearest_rank(percentile: float, n: int) -> int:
    """1-based rank of the nearest-rank percentile, in exact decimal arithmetic."""
    return min(max(math.ceil(Fraction(str(percentile)) * n / 100), 1), n)


def slow_quantize(
    w: np.ndarray, max_level: int, percentile: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row and per element: clip at the nearest-rank percentile of |w|, fp16 scale = clip /
    max_level, level = round-half-even(w / scale) clamped to +-max_level. Returns levels, scales and
    the clips."""
    rows, n = w.shape
    q = np.zeros((rows, n), dtype=np.int64)
    scales = np.zeros(rows, dtype=np.float16)
    clips = np.zeros(rows, dtype=np.float32)
    for r in range(rows):
        ordered = sorted(abs(float(v)) for v in w[r])
        clips[r] = ordered[nearest_rank(percentile, n) - 1]
        scale32 = max(np.float32(clips[r]) / np.float32(max_level), np.float32(2.0**-24))
        scales[r] = np.float16(scale32)
        for c in range(n):
            level = round(float(np.float32(w[r, c]) / np.float32(scales[r])))
            q[r, c] = min(max(level, -max_level), max_level)
    return q, scales, clips


def rows_with_outliers(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.02
    for r in range(rows):  # a few large weights per row, the case percentile clipping is for
        cols = torch.randperm(n, generator=g)[: 1 + r % 4]
        signs = torch.sign(torch.randn(len(cols), generator=g))
        w[r, cols] = (torch.rand(len(cols), generator=g) + 0.5) * 0.3 * signs
    return w


tiny_hparams = functools.partial(
    small_hparams, num_layers=2, num_heads=2, num_kv_heads=1, train_seq_len=16, fp16_keep=KEEP
)


def expected_int6_names(num_layers: int, keep: str = KEEP) -> set[str]:
    names = {
        f"blocks.{i}.{m}.weight"
        for i in range(num_layers)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    }
    return names - {keep}


def randomized_model(h: tg.Hyperparameters, seed: int = 0) -> tg.GPT:
    """build_model, every tensor random (zero-initialized projections would hide quantization)."""
    torch.manual_seed(seed)
    model = tg.build_model(h, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            control = tg.tensor_role(name, p) in ("control", "gate")
            p.copy_(
                torch.randn_like(p) * (0.5 if name == "tok_emb.weight" else 0.05) + float(control)
            )
    return model


def score_stream(
    model: tg.GPT, tokens: torch.Tensor, seq_len: int, luts: tg.ByteLuts
) -> tuple[float, float]:
    """(val_loss, val_bpb) of every target: windows of seq_len tokens side by side, then one window
    ending at the end of the split that scores only the targets the others left."""
    num_targets = tokens.numel() - 1
    full = num_targets // seq_len * seq_len
    # (B, T), (B, T)
    pieces = [(tokens[:full].view(-1, seq_len), tokens[1 : full + 1].view(-1, seq_len), 0)]
    if full < num_targets:
        start = num_targets - seq_len
        pieces.append((tokens[start:num_targets][None], tokens[start + 1 :][None], full - start))
    loss_sum, count, byte_sum = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for x, y, skip in pieces:
            for b in range(0, x.size(0), 64):
                xb, yb = x[b : b + 64].long(), y[b : b + 64].long()
                logits = model(xb)  # (B, T, V)
                losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none")[:, skip:]
                loss_sum += losses.double().sum().item()
                count += losses.numel()
                byte_sum += luts.count(xb[:, skip:], yb[:, skip:]).sum().item()
    assert count == num_targets
    return loss_sum / count, loss_sum / count / math.log(2.0) * count / byte_sum


# -----------------------------------------------------------------------------
# quantize_per_row
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_level", [tg.level_of("int6"), tg.level_of("int8")])
@pytest.mark.parametrize(
    "percentile,n", [(100.0, 200), (99.9, 1000), (95.0, 64), (50.0, 37), (99.99984, 96)]
)
def test_quantize_matches_slow_reference(max_level, percentile, n):
    w = rows_with_outliers(6, n, seed=n)
    q, scale = tg.quantize_per_row(w, max_level, percentile)
    ref_q, ref_scale, clips = slow_quantize(w.numpy(), max_level, percentile)

    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float16 and scale.shape == (w.shape[0],)
    assert np.array_equal(q.numpy().astype(np.int64), ref_q)
    assert np.array_equal(scale.numpy(), ref_scale)
    assert int(q.abs().max()) <= max_level

    deq = tg.dequantize_per_row(q, scale)
    assert torch.equal(deq, q.float() * scale.float()[:, None])
    step = scale.float()[:, None]
    clip = torch.from_numpy(clips)[:, None]
    inside = w.abs() <= clip
    err = (deq - w).abs()
    assert bool((err[inside] <= step.expand_as(w)[inside] / 2).all())  # half a step inside the clip
    # Only weights beyond the clip are clipped: to the extreme level, keeping their sign; and there
    # are at most n - rank of them per row.
    beyond = ~inside
    assert torch.equal(q[beyond].long(), torch.sign(w[beyond]).long() * max_level)
    assert bool((beyond.sum(dim=1) <= n - nearest_rank(percentile, n)).all())
    if percentile == 100.0:
        assert torch.equal(clip[:, 0], w.abs().amax(dim=1)) and not beyond.any()
    if nearest_rank(percentile, n) < n:
        # every row has weights above its percentile: they really are clipped
        assert beyond.any(dim=1).all()


def test_percentile_rank_is_exact_for_decimal_percentiles():
    """The 99.9th percentile of 1000 values is the 999th (floats: 999.0000000000001, ceil 1000)."""
    w = torch.arange(1, 1001, dtype=torch.float32)[None] / 1000
    _, scale = tg.quantize_per_row(w, tg.level_of("int6"), 99.9)
    assert scale.item() == np.float16(np.float32(0.999) / np.float32(31))
    for percentile, n in [(7.0, 100), (57.0, 100), (99.5, 200), (12.5, 64)]:
        row = torch.arange(1, n + 1, dtype=torch.float32)[None]
        _, scale = tg.quantize_per_row(row, tg.level_of("int6"), percentile)
        assert scale.item() == np.float16(np.float32(nearest_rank(percentile, n)) / np.float32(31))


def test_small_weight_rows_keep_their_relative_precision():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 512, generator=g) * 0.02
    small = torch.randn(64, 512, generator=g) * 0.002
    percentile = tg.Hyperparameters().quant_clip_percentile
    q, scale = tg.quantize_per_row(torch.cat([normal, small]), tg.level_of("int6"), percentile)
    deq = tg.dequantize_per_row(q, scale)

    def rel_rms(a, b):
        return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()

    rel_normal, rel_small = rel_rms(deq[:64], normal), rel_rms(deq[64:], small)
    assert rel_small < 1.5 * rel_normal and rel_normal < 1.5 * rel_small
    assert rel_small < 0.1
    assert (q[64:] != 0).float().mean() > 0.9  # the small rows are not swallowed into level 0
    # The test would catch a scale floor of 1/31: such a quantizer zeroes the small rows.
    floored = torch.clamp(torch.round(small / (1 / 31)), -31, 31) * (1 / 31)
    assert rel_rms(floored, small) > 0.99


def test_zero_row_and_tiny_row():
    w = torch.zeros(3, 16)
    w[1, 3] = 1e-7  # far below any fp16 normal number
    w[2] = torch.linspace(-1e-3, 1e-3, 16)
    q, scale = tg.quantize_per_row(w, tg.level_of("int6"), 100.0)
    deq = tg.dequantize_per_row(q, scale)
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    assert torch.equal(deq[0], torch.zeros(16))
    assert deq[1, 3] != 0  # kept, not floored away
    assert (deq[2] - w[2]).abs().max() <= scale[2].float() / 2 * 1.001


# -----------------------------------------------------------------------------
# The artifact in memory and on disk
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("embed_quant", ["fp16", "int8"])
def test_artifact_round_trip_from_disk(tmp_path, embed_quant):
    h = tiny_hparams(embed_quant=embed_quant, tie_embeddings=False, zstd_level=22)
    model = randomized_model(h)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload = tg.quantize_state_dict(state, h)
    in_memory = tg.dequantize_state_dict(payload)
    path = tmp_path / "model.int6.ptz"
    tg.atomic_write_bytes(path, tg.artifact_bytes(payload, h.zstd_level))
    from_disk = tg.dequantize_state_dict(tg.read_artifact(path))

    assert set(from_disk) == set(state) == set(in_memory)
    for name in state:
        assert from_disk[name].dtype == torch.float32 and from_disk[name].shape == state[name].shape
        assert torch.equal(from_disk[name], in_memory[name]), name

    kinds = {name: e["kind"] for name, e in payload["tensors"].items()}
    int6 = expected_int6_names(h.num_layers)
    assert {n for n, k in kinds.items() if k == "int6"} == int6
    assert (
        kinds[KEEP] == "fp16"
        and kinds["tok_emb.weight"] == embed_quant
        and kinds["lm_head.weight"] == "int8"
    )
    controls = {n for n in state if n not in int6 | {KEEP, "tok_emb.weight", "lm_head.weight"}}
    assert controls and all(kinds[n] == "float" for n in controls)
    assert (
        any(".q_gain" in n for n in controls)
        and "smear.gate" in controls
        and "skip_weights" in controls
    )

    for name in controls:  # passed through exactly
        assert torch.equal(from_disk[name], state[name]), name
    assert torch.equal(from_disk[KEEP], state[KEEP].half().float())
    assert not torch.equal(from_disk[KEEP], state[KEEP])
    for name in (
        int6 | {"lm_head.weight"} | ({"tok_emb.weight"} if embed_quant == "int8" else set())
    ):
        max_level = tg.level_of("int6") if name in int6 else tg.level_of("int8")
        e = payload["tensors"][name]
        ref_q, ref_scale, _ = slow_quantize(state[name].numpy(), max_level, h.quant_clip_percentile)
        assert e["q"].dtype == torch.int8 and e["scale"].dtype == torch.float16
        assert np.array_equal(e["q"].numpy().astype(np.int64), ref_q), name
        assert np.array_equal(e["scale"].numpy(), ref_scale), name
        assert torch.equal(
            from_disk[name], torch.from_numpy(ref_q * ref_scale.astype(np.float32)[:, None]).float()
        )
    if embed_quant == "fp16":
        assert torch.equal(from_disk["tok_emb.weight"], state["tok_emb.weight"].half().float())

    fresh = tg.build_model(h, torch.device("cpu"))
    fresh.load_state_dict(from_disk, strict=True)  # the artifact is a complete model


def test_int8_embedding_is_smaller_than_fp16(tmp_path):
    sizes = {}
    for embed_quant in ("fp16", "int8"):
        h = tiny_hparams(embed_quant=embed_quant, vocab_size=512, zstd_level=3)
        sizes[embed_quant] = len(
            tg.artifact_bytes(tg.quantize_state_dict(randomized_model(h).state_dict(), h), 3)
        )
    assert sizes["int8"] < sizes["fp16"] - 512 * 32 // 2


@pytest.fixture(scope="module")
def small_artifact() -> bytes:
    h = tiny_hparams()
    return tg.artifact_bytes(tg.quantize_state_dict(randomized_model(h).state_dict(), h), 3)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_damaged_artifacts_give_clear_errors(tmp_path, small_artifact):
    blob = small_artifact
    assert (
        tg.read_artifact(write(tmp_path / "ok.ptz", blob))["version"] == tg.ARTIFACT_FORMAT_VERSION
    )
    for cut in (len(blob) // 2, len(blob) - 1, len(tg.ARTIFACT_MAGIC) + 3, len(tg.ARTIFACT_MAGIC)):
        with pytest.raises(tg.ArtifactError, match="truncated or corrupt"):
            tg.read_artifact(write(tmp_path / f"cut{cut}.ptz", blob[:cut]))
    rng = np.random.default_rng(0)
    for pos in [
        len(blob) // 2,
        len(blob) - 2,
        *rng.integers(len(tg.ARTIFACT_MAGIC) + 16, len(blob), 8),
    ]:
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(tg.ArtifactError, match="truncated or corrupt"):
            tg.read_artifact(write(tmp_path / "flip.ptz", bytes(flipped)))
    # Every single-bit flip in the magic and the zstd frame header: an ArtifactError, or (for the
    # flag bits zstd ignores) the intact payload; never another exception.
    header = len(tg.ARTIFACT_MAGIC) + 14
    intact = tg.dequantize_state_dict(tg.read_artifact(tmp_path / "ok.ptz"))
    for pos in range(header):
        for bit in range(8):
            flipped = bytearray(blob)
            flipped[pos] ^= 1 << bit
            try:
                payload = tg.read_artifact(write(tmp_path / "hdr.ptz", bytes(flipped)))
            except tg.ArtifactError:
                continue
            assert all(
                torch.equal(a, intact[k]) for k, a in tg.dequantize_state_dict(payload).items()
            )
    # A damaged size field declaring 32 TiB of content: zstd tries to allocate it up front.
    table = tg.stream_table(blob[len(tg.ARTIFACT_MAGIC) :])
    start = len(tg.ARTIFACT_MAGIC) + 8 + len(table) * tg.STREAM_ENTRY.size
    frame = blob[start : start + table[0][1]]  # the header stream, zstd
    # frame header: magic (4), descriptor (1), window (0 or 1), content size (0-8)
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    size_len = {0: int(single_segment), 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    blocks = frame[5 + (not single_segment) + size_len :]
    # 8-byte size field
    huge = frame[:4] + bytes([descriptor | 0xE0]) + (2**45).to_bytes(8, "little") + blocks
    assert zstandard.get_frame_parameters(huge).content_size == 2**45
    forged = stream_container([("zstd", huge)])
    with pytest.raises(tg.ArtifactError, match="truncated or corrupt"):
        tg.read_artifact(write(tmp_path / "huge.ptz", forged))


def stream_container(streams: list[tuple[str, bytes]]) -> bytes:
    """An artifact from (codec, compressed stream) pairs, built by hand."""
    table = tg.STREAMS_MAGIC + struct.pack("<I", len(streams))
    table += b"".join(tg.STREAM_ENTRY.pack(tg.CODECS.index(c), len(b)) for c, b in streams)
    return tg.ARTIFACT_MAGIC + table + b"".join(b for _, b in streams)


def test_non_artifacts_are_refused(tmp_path, small_artifact):
    h = tiny_hparams()
    raw = write(tmp_path / "raw.pt", tg.torch_save_bytes(randomized_model(h).state_dict()))
    with pytest.raises(tg.ArtifactError, match="bad magic"):
        tg.read_artifact(raw)
    with pytest.raises(tg.ArtifactError, match="bad magic"):
        tg.read_artifact(write(tmp_path / "text.ptz", b"hello, this is not a model\n"))
    with pytest.raises(tg.ArtifactError, match="bad magic"):
        tg.read_artifact(write(tmp_path / "empty.ptz", b""))
    with pytest.raises(tg.ArtifactError, match="truncated or corrupt .*no stream table"):
        tg.read_artifact(write(tmp_path / "v2.ptz", tg.ARTIFACT_MAGIC + zstandard.compress(b"x")))
    junk = stream_container([("zstd", zstandard.compress(b"not a torch file"))])
    with pytest.raises(tg.ArtifactError, match="unreadable"):
        tg.read_artifact(write(tmp_path / "junk.ptz", junk))
    other = tg.torch_save_bytes({"format": "something-else", "tensors": {}})
    with pytest.raises(tg.ArtifactError, match="not a pgolf-int6"):
        tg.read_artifact(
            write(tmp_path / "other.ptz", stream_container([("lzma", lzma.compress(other))]))
        )
    payload = tg.read_artifact(write(tmp_path / "ok.ptz", small_artifact))
    payload["version"] = tg.ARTIFACT_FORMAT_VERSION + 1
    with pytest.raises(tg.ArtifactError, match="format version"):
        tg.read_artifact(write(tmp_path / "future.ptz", tg.artifact_bytes(payload, 3)))


class RunsCode:
    """Unpickling this creates a directory: a stand-in for arbitrary code in a hostile file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    h = tiny_hparams()
    marker = tmp_path / "code_ran"
    payload = tg.quantize_state_dict(randomized_model(h).state_dict(), h)
    payload["extra"] = RunsCode(marker)
    blob = tg.artifact_bytes(payload, 3)  # wrapped exactly like a real artifact
    assert blob.startswith(tg.ARTIFACT_MAGIC)
    with pytest.raises(tg.ArtifactError, match="unreadable"):
        tg.read_artifact(write(tmp_path / "hostile.ptz", blob))
    assert not marker.exists()
    # The payload is really hostile: an unrestricted load runs it.
    raw = tg.read_streams(blob[len(tg.ARTIFACT_MAGIC) :])[0]
    torch.load(io.BytesIO(raw), weights_only=False)
    assert marker.is_dir()


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk full")

    final = tmp_path / "out" / "model.int6.ptz"
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        tg.atomic_write_bytes(final, b"x" * 100_000)
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # no temporary file left behind

    monkeypatch.undo()
    tg.atomic_write_bytes(final, b"old artifact")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        tg.atomic_write_bytes(final, b"new artifact")
    assert final.read_bytes() == b"old artifact"  # an existing file is never half-replaced
    assert [p.name for p in final.parent.iterdir()] == [final.name]


# -----------------------------------------------------------------------------
# QAT: fake quantization in the compiled training forward, straight-through gradients
# -----------------------------------------------------------------------------


def test_fake_quantize_is_straight_through():
    w = (torch.randn(24, 40) * 0.05).requires_grad_()
    out = tg.fake_quantize(w, tg.level_of("int6"), 95.0)
    q, scale = tg.quantize_per_row(w.detach(), tg.level_of("int6"), 95.0)
    assert torch.equal(out.detach(), tg.dequantize_per_row(q, scale))
    upstream = torch.randn(24, 40)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def hand_quantized(model: tg.GPT, percentile: float) -> tg.GPT:
    """A copy with QAT off whose int6 weights were replaced by quantize -> dequantize."""
    ref = copy.deepcopy(model)
    tg.configure_qat(ref, tg.Hyperparameters(qat=False))
    with torch.no_grad():
        for name in expected_int6_names(len(ref.blocks)):
            p = ref.get_parameter(name)
            p.copy_(tg.dequantize_per_row(*tg.quantize_per_row(p, tg.level_of("int6"), percentile)))
    return ref


def test_qat_runs_in_the_compiled_training_forward_only():
    # below the rank of the largest weight for rows of 32 or 64: exercises kthvalue
    percentile = 95.0
    h = tiny_hparams(quant_clip_percentile=percentile)
    assert h.qat  # on by default
    model = randomized_model(h)
    qat_on = {
        n for n, m in model.named_modules() if isinstance(m, tg.CastedLinear) and m.qat is not None
    }
    # exactly what ships as int6
    assert {f"{n}.weight" for n in qat_on} == expected_int6_names(h.num_layers)
    ref = hand_quantized(model, percentile).eval()
    plain = copy.deepcopy(model).eval()
    ids = torch.randint(
        0, h.vocab_size, (2, h.train_seq_len), generator=torch.Generator().manual_seed(1)
    )
    ids[:, 5] = tg.BOS_ID
    with torch.no_grad():
        want_train, want_eval = ref(ids), plain(ids)
    qat_effect = (want_train - want_eval).abs().max()
    assert qat_effect > 1e-2  # quantization is visible in the output

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        with torch.no_grad():
            model.train()
            got_train = compiled(ids)
            model.eval()
            got_eval = compiled(ids)
            model.train()
            got_train_again = compiled(ids)
    finally:
        torch._dynamo.reset()
    # The compiled grid is the export's grid (test_compiled_fake_quantize_is_the_export_grid); what
    # remains is float reassociation in the fused forward.
    assert torch.allclose(got_train, want_train, rtol=1e-5, atol=1e-5)
    assert (got_train - want_eval).abs().max() > 0.5 * qat_effect
    assert torch.allclose(got_eval, want_eval, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_train_again, got_train)


@pytest.mark.parametrize("percentile", [100.0, 95.0])
def test_compiled_fake_quantize_is_the_export_grid(percentile):
    """Inductor drops an fp32->fp16->fp32 cast pair; the scale rounding must survive compilation, or
    the training forward would quantize on a different grid than the artifact."""
    g = torch.Generator().manual_seed(7)
    # scales across fp16 ranges
    w = torch.randn(96, 160, generator=g) * torch.logspace(-4, -1, 96)[:, None]
    q, scale = tg.quantize_per_row(w, tg.level_of("int6"), percentile)
    exported = tg.dequantize_per_row(q, scale)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            lambda x: tg.fake_quantize(x, tg.level_of("int6"), percentile), fullgraph=True
        )(w)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, exported)
    assert torch.equal(tg.fake_quantize(w, tg.level_of("int6"), percentile), exported)


def test_qat_gradients_flow_straight_through_the_compiled_model():
    """Gradients w.r.t. the fp32 weights equal those of the hand-quantized model w.r.t. its weights.

    Dynamo traces the whole graph (where a constant-folded flag would drop the fake quantization);
    the aot_eager backend keeps this cheap."""
    h = tiny_hparams(quant_clip_percentile=100.0)
    model = randomized_model(h, seed=3)
    ref = hand_quantized(model, 100.0)
    ids = torch.randint(
        0, h.vocab_size, (2, h.train_seq_len + 1), generator=torch.Generator().manual_seed(2)
    )
    torch._dynamo.reset()
    try:
        loss = torch.compile(model, fullgraph=True, backend="aot_eager")(ids[:, :-1], ids[:, 1:])
        loss.backward()
    finally:
        torch._dynamo.reset()
    ref_loss = ref(ids[:, :-1], ids[:, 1:])
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        ref_grad = ref.get_parameter(name).grad
        assert torch.allclose(p.grad, ref_grad, rtol=1e-4, atol=1e-6), name
    plain = randomized_model(h, seed=3)  # the same weights, QAT off: other gradients
    tg.configure_qat(plain, tg.Hyperparameters(qat=False))
    plain(ids[:, :-1], ids[:, 1:]).backward()
    name = "blocks.0.mlp.fc.weight"
    assert not torch.allclose(
        model.get_parameter(name).grad, plain.get_parameter(name).grad, rtol=1e-3, atol=1e-6
    )


# -----------------------------------------------------------------------------
# Real runs: size accounting, the summary, round trip, re-export
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A tiny run at ZSTD_LEVEL=22 with an FP16_KEEP pattern, then its raw checkpoint re-exported.

    Both run a copy of train_gpt.py, so the code size they report is that of a file nobody edits
    meanwhile."""
    root = tmp_path_factory.mktemp("artifact_runs")
    code = root / "train_gpt.py"
    shutil.copyfile(ROOT / "train_gpt.py", code)
    env = tiny_env(tiny_data, root, RUN_ID=RUN_ID, ZSTD_LEVEL=22, FP16_KEEP=KEEP)
    run_script(env, script=code)
    raw = Path(env["ARTIFACT_DIR"]) / f"{RUN_ID}_raw.pt"
    re_env = {**env, "RUN_ID": "reexport", "ITERATIONS": "0", "INIT_CHECKPOINT": str(raw)}
    run_script(re_env, script=code)
    logs = Path(env["LOG_DIR"])
    return {
        "env": env,
        "code": code,
        "raw": raw,
        "artifacts": Path(env["ARTIFACT_DIR"]),
        "summary": json.loads((logs / f"{RUN_ID}.json").read_text()),
        "log": log_events(logs / f"{RUN_ID}.txt"),
        "re_summary": json.loads((logs / "reexport.json").read_text()),
    }


SUMMARY_FIELDS = [
    "run_id",
    "seed",
    "val_bpb",
    "val_loss",
    "prequant_val_bpb",
    "roundtrip_val_bpb",
    "sliding_val_bpb",
    "bytes_model",
    "bytes_code",
    "bytes_total",
    "fits",
    "steps",
    "train_time_ms",
    "step_avg_ms",
    "world_size",
    "artifact_path",
]


def test_size_accounting_matches_the_files(runs):
    s, log = runs["summary"], runs["log"]
    artifact = runs["artifacts"] / f"{RUN_ID}.int6.ptz"
    assert Path(s["artifact_path"]) == artifact
    assert s["bytes_model"] == os.path.getsize(artifact)
    assert s["bytes_code"] == os.path.getsize(runs["code"])
    assert s["bytes_total"] == s["bytes_model"] + s["bytes_code"]
    assert s["fits"] is True
    total = re.findall(r"^Total submission size int6\+zstd-22: (\d+) bytes$", log, re.M)
    model = re.findall(r"^Serialized model int6\+zstd-22: (\d+) bytes$", log, re.M)
    code = re.findall(r"^Code size: (\d+) bytes$", log, re.M)
    fits = re.findall(r"^fits_16mb:(true|false) margin:(-?\d+)$", log, re.M)
    assert [int(x) for x in total] == [s["bytes_total"]]
    assert [int(x) for x in model] == [s["bytes_model"]] and [int(x) for x in code] == [
        s["bytes_code"]
    ]
    assert fits == [("true", str(16_000_000 - s["bytes_total"]))]
    assert "WARNING" not in log
    first = (
        (Path(runs["env"]["LOG_DIR"]) / f"{RUN_ID}.txt").read_text(encoding="utf-8").splitlines()[0]
    )
    code_sha256 = hashlib.sha256(runs["code"].read_bytes()).hexdigest()
    assert first == f"code_begin path:train_gpt.py bytes:{s['bytes_code']} sha256:{code_sha256}"
    assert s["code_sha256"] == code_sha256  # the logged source is the file that ran


def test_artifact_is_zstd22_of_the_raw_checkpoint_quantized(runs):
    """The file on disk is exactly the raw checkpoint's export: same tensors, zstd at level 22."""
    h = tg.Hyperparameters.from_env(runs["env"])
    raw_state = torch.load(runs["raw"], map_location="cpu", weights_only=True)
    blob = (runs["artifacts"] / f"{RUN_ID}.int6.ptz").read_bytes()
    payload = tg.quantize_state_dict(raw_state, h)
    assert blob == tg.artifact_bytes(payload, 22)
    assert blob != tg.artifact_bytes(payload, 3)
    body = blob[len(tg.ARTIFACT_MAGIC) :]
    start = 8 + len(tg.stream_table(body)) * tg.STREAM_ENTRY.size
    for codec, length in tg.stream_table(body):  # every stream zstd, with a checksum
        assert codec == "zstd" and zstandard.get_frame_parameters(body[start:]).has_checksum
        start += length
    read_back = tg.read_artifact(runs["artifacts"] / f"{RUN_ID}.int6.ptz")
    kinds = {name: e["kind"] for name, e in read_back["tensors"].items()}
    assert {n for n, k in kinds.items() if k == "int6"} == expected_int6_names(h.num_layers)
    # the default EMBED_QUANT, FP16_KEEP
    assert kinds["tok_emb.weight"] == "fp16" and kinds[KEEP] == "fp16"
    on_disk = tg.dequantize_state_dict(read_back)
    in_memory = tg.dequantize_state_dict(payload)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in in_memory)
    assert torch.equal(on_disk[KEEP], raw_state[KEEP].half().float())
    # The raw checkpoint is saved before quantization: its block matrices are not on the int6 grid.
    name = "blocks.0.mlp.fc.weight"
    assert not torch.equal(raw_state[name], on_disk[name])


def test_summary_has_every_field_and_setting(runs):
    s, env = runs["summary"], runs["env"]
    missing = [k for k in SUMMARY_FIELDS if k not in s]
    assert not missing
    assert set(tg.Hyperparameters.env_names()) <= set(s["hyperparameters"])
    assert s["hyperparameters"] == {**tg.Hyperparameters.from_env(env).as_env(), "RUN_ID": RUN_ID}
    assert s["hyperparameters"]["ZSTD_LEVEL"] == 22 and s["hyperparameters"]["FP16_KEEP"] == KEEP
    assert s["run_id"] == RUN_ID and s["seed"] == int(env["SEED"]) and s["world_size"] == 1
    # EVAL_STRIDE=0: no sliding window
    assert s["steps"] == int(env["ITERATIONS"]) and s["sliding_val_bpb"] is None
    assert s["val_bpb"] == s["roundtrip_val_bpb"] and s["val_loss"] == s["roundtrip_val_loss"]
    assert s["step_avg_ms"] == pytest.approx(s["train_time_ms"] / s["steps"], abs=1e-2)
    assert s["train_time_ms"] > 0


def test_round_trip_scores_the_artifact_on_the_whole_split(runs, tiny_data):
    """Both logged scores, recomputed here: the raw checkpoint's (pre-quant) and the artifact's."""
    h = tg.Hyperparameters.from_env(runs["env"])
    s, log = runs["summary"], runs["log"]
    tokens = tg.load_validation_tokens(
        os.path.join(h.data_path, "fineweb_val_*.bin"), h.train_seq_len
    )
    luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size)
    assert s["scored_tokens"] == tokens.numel() - 1 == tiny_data["val_tokens"] - 1

    model = tg.build_model(h, torch.device("cpu"))
    model.load_state_dict(tg.dequantize_state_dict(tg.read_artifact(Path(s["artifact_path"]))))
    loss, bpb = score_stream(model, tokens, h.train_seq_len, luts)
    assert s["roundtrip_val_loss"] == pytest.approx(loss, rel=1e-6)
    assert s["roundtrip_val_bpb"] == pytest.approx(bpb, rel=1e-6)
    raw = tg.build_model(h, torch.device("cpu"))
    raw.load_state_dict(torch.load(runs["raw"], weights_only=True))
    pre_loss, pre_bpb = score_stream(raw, tokens, h.train_seq_len, luts)
    assert s["prequant_val_loss"] == pytest.approx(pre_loss, rel=1e-6)
    assert s["prequant_val_bpb"] == pytest.approx(pre_bpb, rel=1e-6)
    assert loss != pre_loss

    line = re.search(
        r"^final_int6_roundtrip_exact val_loss:(\S+) val_bpb:(\S+) quant_penalty_bpb:(\S+)",
        log,
        re.M,
    )
    pre = re.search(r"^final_prequant_exact val_loss:(\S+) val_bpb:(\S+)$", log, re.M)
    logged = [float(line[1]), float(line[2]), float(pre[1]), float(pre[2])]
    summary = [
        s["roundtrip_val_loss"],
        s["roundtrip_val_bpb"],
        s["prequant_val_loss"],
        s["prequant_val_bpb"],
    ]
    assert logged == pytest.approx(summary, abs=1e-8)  # printed with 8 decimals
    assert float(line[3]) == pytest.approx(s["roundtrip_val_bpb"] - s["prequant_val_bpb"], abs=1e-5)


def test_reexport_from_the_raw_checkpoint_reproduces_the_artifact(runs):
    s, r = runs["summary"], runs["re_summary"]
    original = (runs["artifacts"] / f"{RUN_ID}.int6.ptz").read_bytes()
    again = Path(r["artifact_path"])
    assert again == runs["artifacts"] / "reexport.int6.ptz"
    assert again.read_bytes() == original
    assert (
        r["steps"] == 0
        and r["bytes_model"] == s["bytes_model"]
        and r["bytes_total"] == s["bytes_total"]
    )
    for key in ("roundtrip_val_loss", "roundtrip_val_bpb", "prequant_val_loss", "prequant_val_bpb"):
        assert r[key] == s[key], key


def test_over_the_limit_warns_and_still_finishes(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tg, "SIZE_LIMIT_BYTES", 1000)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="over", ITERATIONS=0)
    summary = tg.main(env)
    log = log_events(Path(env["LOG_DIR"]) / "over.txt")
    on_disk = json.loads((Path(env["LOG_DIR"]) / "over.json").read_text())
    assert summary["fits"] is False and on_disk["fits"] is False
    over = summary["bytes_total"] - 1000
    assert (
        summary["bytes_total"] == os.path.getsize(summary["artifact_path"]) + summary["bytes_code"]
    )
    assert re.search(rf"^fits_16mb:false margin:{-over}$", log, re.M)
    assert re.search(rf"^WARNING: .*{over} bytes OVER the 1000-byte limit", log, re.M)
    assert "run_complete" in log and on_disk["roundtrip_val_bpb"] == summary["roundtrip_val_bpb"]
    assert "WARNING" in capsys.readouterr().out


def test_failed_export_keeps_the_raw_checkpoint_and_no_artifact(tiny_data, tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_failing_for_artifacts(src, dst):
        if str(dst).endswith(".int6.ptz"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_for_artifacts)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="broken_export", ITERATIONS=0)
    with pytest.raises(OSError, match="disk full"):
        tg.main(env)
    artifacts = Path(env["ARTIFACT_DIR"])
    # no artifact, no temporary file
    assert [p.name for p in artifacts.iterdir()] == ["broken_export_raw.pt"]
    model = tg.build_model(tg.Hyperparameters.from_env(env), torch.device("cpu"))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state, kind, _ = tg.read_weights(
        str(artifacts / "broken_export_raw.pt"), "INIT_CHECKPOINT", shapes
    )
    assert kind == "raw checkpoint"
    model.load_state_dict(state)
    assert not (Path(env["LOG_DIR"]) / "broken_export.json").exists()
