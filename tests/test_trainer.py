"""The trainer core on CPU: model pieces, Muon, schedules, settings, data, byte counts, whole runs.

Whole runs of train_gpt.py (a copy, so that edits to the repository's file cannot race with them)
start together once per module, two at a time; each test waits only for the runs it reads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import (
    CPU,
    IMPORT_PROBE,
    ROOT,
    decoded_document_bytes,
    randomized,
    run_script,
    small_hparams,
    tiny_env,
    write_shard,
)
from trainer_helpers import MUON_SHAPES, muon_trajectory, muon_worker

# -----------------------------------------------------------------------------
# Model: causality, SmearGate, attention
# -----------------------------------------------------------------------------


small_h = functools.partial(small_hparams, num_layers=3)


def test_changing_later_tokens_never_changes_earlier_logits():
    h = small_h(smear_gate="blend")
    model = randomized(tg.GPT(h), seed=1, dtype=torch.float32).eval()
    assert model.smear.gate.abs().min() > 0
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, h.vocab_size, (2, 24), generator=gen)
    ids[:, [0, 9, 10]] = tg.BOS_ID
    with torch.no_grad():
        base = model(ids)
        for t in [0, 5, 8, 9, 15, 22]:
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(4, h.vocab_size, (2, 23 - t), generator=gen)
            # surely a different token
            changed[:, t + 1] = (ids[:, t + 1] + 1 - 4) % (h.vocab_size - 4) + 4
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
            # the changed position does see it
            assert (out[:, t + 1] - base[:, t + 1]).abs().amax() > 1e-3


def test_smear_gate_blends_the_previous_token_except_at_bos_and_position_0():
    dim = 8
    smear = tg.SmearGate(dim)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        smear.gate.copy_(torch.randn(dim, generator=gen) * 2)
    x = torch.randn(2, 6, dim, generator=gen)
    ids = torch.tensor([[1, 5, 6, 1, 7, 8], [9, 1, 10, 11, 12, 1]])
    with torch.no_grad():
        out = smear(x, ids)

    g = 1.0 / (1.0 + np.exp(-smear.gate.detach().double().numpy()))
    xs = x.double().numpy()
    expected = xs.copy()
    for b in range(2):
        for t in range(1, 6):
            if ids[b, t] != 1:
                expected[b, t] = (1 - g) * xs[b, t] + g * xs[b, t - 1]
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=1e-6)
    # position 0 and every BOS: bit for bit unchanged
    for b, t in [(0, 0), (0, 3), (1, 0), (1, 1), (1, 5)]:
        assert torch.equal(out[b, t], x[b, t])
    assert int(((out - x).abs().amax(-1) > 1e-3).sum()) == 12 - 5  # every other position did blend


def reference_attention(
    attn: tg.CausalSelfAttention, x: torch.Tensor, rope_base: float, kv_head_of=None
) -> torch.Tensor:
    """Slow float64 attention: per head softmax(q k^T / sqrt(D)) with a causal mask, then proj."""
    H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    B, T, C = x.shape
    # repeat_interleave: neighbours share
    kv_head_of = kv_head_of or (lambda head: head // (H // KV))
    xd = x.double()

    def heads(linear, n):
        return (xd @ linear.weight.double().T).view(B, T, n, D)

    def rms(z):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)

    # RoPE as in the baseline: pair (j, j + D/2) as a complex number, rotated by -t * base^(-2j/D)
    j = torch.arange(D // 2, dtype=torch.float64)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * rope_base ** (-2.0 * j / D)  # (T, D/2)

    def rope(z):
        zc = (
            torch.complex(z[..., : D // 2], z[..., D // 2 :])
            * torch.exp(-1j * theta)[None, :, None, :]
        )
        return torch.cat([zc.real, zc.imag], dim=-1)

    q = rope(rms(heads(attn.c_q, H))) * attn.q_gain.double()[None, None, :, None]
    k = rope(rms(heads(attn.c_k, KV)))
    v = heads(attn.c_v, KV)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for head in range(H):
        kv = kv_head_of(head)
        scores = q[:, :, head] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y[:, :, head] = probs @ v[:, :, kv]
    return y.reshape(B, T, C) @ attn.proj.weight.double().T


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_equals_hand_attention_with_repeated_kv_heads(num_kv_heads):
    h = small_h(num_heads=4, num_kv_heads=num_kv_heads, model_dim=32)
    attn = randomized(tg.CausalSelfAttention(h, layer_idx=0), seed=4, dtype=torch.float32).eval()
    with torch.no_grad():
        # peaked attention, a demanding comparison
        attn.q_gain.copy_(torch.tensor([1.0, 2.0, 3.0, 1.5]))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = attn(x)
    expected = reference_attention(attn, x, h.rope_base)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=2e-5)
    if 1 < num_kv_heads < 4:  # the other grouping (heads h and h + KV share) is a different model
        tiled = reference_attention(
            attn, x, h.rope_base, kv_head_of=lambda head: head % num_kv_heads
        )
        assert (out.double() - tiled).abs().amax() > 1e-2


# -----------------------------------------------------------------------------
# Muon
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(128, 32), (32, 128), (300, 10), (64, 64)])
def test_newton_schulz_puts_singular_values_in_a_band_around_1(shape):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        if shape[0] == shape[1]:
            # A Gaussian square matrix has singular values near 0 that five iterations cannot lift;
            # use a random one with condition number 100 instead.
            u, _ = torch.linalg.qr(torch.randn(*shape, generator=gen))
            v, _ = torch.linalg.qr(torch.randn(*shape, generator=gen))
            g = u @ torch.diag(torch.logspace(0, -2, shape[0])) @ v.T
        else:
            g = torch.randn(*shape, generator=gen)
        out = tg.zeropower_via_newtonschulz5(g, steps=5).double()
        assert out.shape == g.shape
        sv = torch.linalg.svdvals(out)
        assert 0.6 <= sv.min() and sv.max() <= 1.25, (shape, seed, sv.min().item(), sv.max().item())
        # The singular vectors are g's: U^T out V is diagonal up to bf16 noise, entries positive.
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        m = u.T @ out @ vh.T
        diag = torch.diag(m)
        assert (m - torch.diag(diag)).norm() < 0.06 * diag.norm()
        assert diag.min() > 0.6


def test_muon_steps_on_two_gloo_processes_equal_one_process(tmp_path):
    before, expected = muon_trajectory()
    mp.spawn(
        muon_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [t.shape for t in got] == [torch.Size(s) for s in MUON_SHAPES]
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g)
    for b, e in zip(before, expected, strict=True):
        assert (e - b).abs().amax() > 1e-2  # every matrix was updated


# -----------------------------------------------------------------------------
# Schedules: exact values, worked out by hand
# -----------------------------------------------------------------------------

# iterations=100, warmdown_iters=20: flat until step 80, then (100 - step) / 20.
STEP_WARMDOWN = [
    (0, 1.0),
    (50, 1.0),
    (79, 1.0),
    (80, 1.0),
    (81, 0.95),
    (90, 0.5),
    (95, 0.25),
    (99, 0.05),
]
# iterations=10, warmdown_iters=20: the warmdown started before step 0.
LONG_WARMDOWN = [(0, 0.5), (5, 0.25), (9, 0.05)]
# max_wallclock_ms=1000, warmdown_iters=10: step_ms = elapsed/step, warmdown_ms = 10 * step_ms,
# remaining = 1000 - elapsed; the LR is remaining/warmdown_ms once remaining <= warmdown_ms.
WALLCLOCK_WARMDOWN = [
    (0, 0.0, 1.0),  # no step time known yet
    (10, 400.0, 1.0),  # 40 ms/step: warmdown 400 ms, 600 ms remain
    (10, 500.0, 1.0),  # 50 ms/step: warmdown 500 ms, 500 ms remain: exactly at its start
    (10, 600.0, 2 / 3),  # 60 ms/step: 400 / 600
    (20, 900.0, 2 / 9),  # 45 ms/step: 100 / 450
    (5, 950.0, 1 / 38),  # 190 ms/step: 50 / 1900
    (30, 1200.0, 0.0),  # past the cap
]
# start 0.92, end 0.99 over 1500 steps: 0.92 + 0.07 * step / 1500, then 0.99.
MOMENTUM = [(0, 0.92), (300, 0.934), (750, 0.955), (1500, 0.99), (4000, 0.99)]


def test_lr_multiplier_step_based_matches_hand_table():
    for step, want in STEP_WARMDOWN:
        got = tg.lr_multiplier(step, 1e9, iterations=100, warmdown_iters=20, max_wallclock_ms=None)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), step
    for step, want in LONG_WARMDOWN:
        got = tg.lr_multiplier(step, 0.0, iterations=10, warmdown_iters=20, max_wallclock_ms=None)
        assert got == pytest.approx(want, rel=1e-12), step
    for step in (0, 50, 99):
        assert (
            tg.lr_multiplier(step, 0.0, iterations=100, warmdown_iters=0, max_wallclock_ms=None)
            == 1.0
        )
        assert (
            tg.lr_multiplier(step, 5e3, iterations=100, warmdown_iters=0, max_wallclock_ms=1e3)
            == 1.0
        )


def test_lr_multiplier_wallclock_based_matches_hand_table():
    for step, elapsed_ms, want in WALLCLOCK_WARMDOWN:
        got = tg.lr_multiplier(
            step, elapsed_ms, iterations=10**6, warmdown_iters=10, max_wallclock_ms=1000.0
        )
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (step, elapsed_ms)


def test_muon_momentum_warmup_matches_hand_table():
    for step, want in MOMENTUM:
        got = tg.muon_momentum_at(step, start=0.92, end=0.99, warmup_steps=1500)
        assert got == pytest.approx(want, rel=1e-12), step
    assert tg.muon_momentum_at(0, start=0.92, end=0.99, warmup_steps=0) == pytest.approx(
        0.99, rel=1e-12
    )


# -----------------------------------------------------------------------------
# Settings: every class of bad input gets its error
# -----------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"MODEL_DIM": "abc"}, "MODEL_DIM='abc' is not an integer"),
    ({"NUM_LAYERS": "2.5"}, "NUM_LAYERS='2.5' is not an integer"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR='fast' is not a number"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR='nan' must be finite"),
    ({"TIE_EMBEDDINGS": "yes"}, "TIE_EMBEDDINGS='yes' must be 0 or 1"),
    ({"QAT": "true"}, "QAT='true' must be 0 or 1"),
    ({"SMEAR_GATE": "2"}, "SMEAR_GATE='2' must be one of 0, blend, gated"),
    ({"NUM_LAYERS": "-1"}, "NUM_LAYERS=-1 must be positive"),
    ({"MODEL_DIM": "0"}, "MODEL_DIM=0 must be positive"),
    ({"TRAIN_SEQ_LEN": "-64"}, "TRAIN_SEQ_LEN=-64 must be positive"),
    ({"ROPE_BASE": "0"}, "ROPE_BASE=0.0 must be positive"),
    ({"ITERATIONS": "-5"}, "ITERATIONS=-5 must not be negative"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "MAX_WALLCLOCK_SECONDS=-1.0 must not be negative"),
    ({"MODEL_DIM": "500", "NUM_HEADS": "8"}, "MODEL_DIM=500 is not divisible by NUM_HEADS=8"),
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, "NUM_HEADS=8 is not divisible by NUM_KV_HEADS=3"),
    (
        {"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"},
        "MODEL_DIM/NUM_HEADS=3 must be even",
    ),
    ({"MUON_MOMENTUM": "1.0"}, "MUON_MOMENTUM=1.0 must be in [0, 1)"),
    ({"EMBED_QUANT": "int4"}, "EMBED_QUANT='int4' must be one of fp16, int8"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE=70000 must be in 1..65536"),
]


@pytest.mark.parametrize(
    "env, message",
    BAD_SETTINGS,
    ids=[m.split("=")[0] + str(i) for i, (_, m) in enumerate(BAD_SETTINGS)],
)
def test_bad_settings_raise_naming_the_variable_and_the_rule(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tg.Hyperparameters.from_env(env)


def test_good_settings_parse_to_typed_values():
    h = tg.Hyperparameters.from_env(
        {
            "MODEL_DIM": " 64 ",
            "TIE_EMBEDDINGS": "0",
            "MATRIX_LR": "1e-3",
            "RUN_ID": "x",
            "PATH": "/bin",
        }
    )
    assert (h.model_dim, h.tie_embeddings, h.matrix_lr, h.run_id) == (64, False, 0.001, "x")
    assert h.overrides() == {
        "MODEL_DIM": 64,
        "TIE_EMBEDDINGS": False,
        "MATRIX_LR": 0.001,
        "RUN_ID": "x",
    }


def test_grad_accum_steps_resolve_or_refuse_batches_that_do_not_split():
    h = tg.Hyperparameters(train_batch_tokens=1024, train_seq_len=64)
    assert [tg.resolve_grad_accum_steps(h, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert tg.resolve_grad_accum_steps(dataclasses.replace(h, grad_accum_steps=2), 8) == 2
    with pytest.raises(
        ValueError, match=re.escape("WORLD_SIZE=3 does not divide 8; set GRAD_ACCUM_STEPS")
    ):
        tg.resolve_grad_accum_steps(h, 3)
    with pytest.raises(
        ValueError,
        match=r"TRAIN_BATCH_TOKENS=1000 does not split into whole sequences.*"
        r"WORLD_SIZE\*GRAD_ACCUM_STEPS\*TRAIN_SEQ_LEN=1\*8\*64=512",
    ):
        tg.resolve_grad_accum_steps(dataclasses.replace(h, train_batch_tokens=1000), 1)
    with pytest.raises(ValueError, match=r"TRAIN_BATCH_TOKENS=1024 .*=3\*2\*64=384"):
        tg.resolve_grad_accum_steps(dataclasses.replace(h, grad_accum_steps=2), 3)


def test_misspelled_and_lower_case_settings_get_a_warning_naming_the_real_one():
    env = {
        "MLP_MUL": "3",
        "MODEL_DIM": "64",
        "PATH": "/usr/bin",
        "HOME": "/root",
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": "29500",
        "LOCAL_WORLD_SIZE": "2",
        "mlp_mul": "3",
        "num_layers": "4",
    }
    warnings = tg.setting_warnings(env, tg.Hyperparameters())
    assert len(warnings) == 3
    assert "MLP_MUL " in warnings[0] and "MLP_MULT" in warnings[0]
    assert "mlp_mul is not a setting" in warnings[1] and "MLP_MULT" in warnings[1]
    assert "num_layers is not read" in warnings[2] and "NUM_LAYERS" in warnings[2]


def test_short_forms_and_lower_case_misspellings_get_a_warning_and_the_environment_none():
    env = {"num_layer": "3", "VOCAB": "2048", "ITERS": "5", "LAYERS": "3"}
    env |= {k: "x" for k in ("HOSTNAME", "SHELL", "TERM", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    env |= {k: "0" for k in ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID")}
    meant = {w.split()[1]: w.split()[-1] for w in tg.setting_warnings(env, tg.Hyperparameters())}
    assert meant == {
        "ITERS": "ITERATIONS?",
        "LAYERS": "NUM_LAYERS?",
        "VOCAB": "VOCAB_SIZE?",
        "num_layer": "NUM_LAYERS?",
    }
    (untrained,) = tg.setting_warnings({}, tg.Hyperparameters(iterations=0))
    assert "ITERATIONS=0 and no INIT_CHECKPOINT: it scores an untrained model" in untrained
    assert tg.setting_warnings({}, tg.Hyperparameters(iterations=0, init_checkpoint="w.pt")) == []


def test_an_explicit_value_that_replaces_a_presets_is_warned_about():
    env = {"PRESET": "pr114", "EVAL_STRIDE": "64", "TRAIN_SEQ_LEN": " 2048", "QAT": "0"}
    h = tg.Hyperparameters.from_env(env)
    assert h.eval_stride == 64 and h.train_seq_len == 2048  # the explicit value wins
    assert tg.setting_warnings(env, h) == [
        "warning: EVAL_STRIDE=64 replaces PRESET=pr114's EVAL_STRIDE=256"
    ]  # the same values as the preset's (TRAIN_SEQ_LEN, QAT) say nothing
    assert tg.setting_warnings({"EVAL_STRIDE": "64"}, tg.Hyperparameters()) == []


def test_a_stride_that_turns_sliding_evaluation_off_gets_a_warning():
    assert tg.setting_warnings({}, tg.Hyperparameters()) == []
    for h in (
        tg.Hyperparameters(eval_stride=1024),
        tg.Hyperparameters(eval_seq_len=256, eval_stride=300),
    ):
        (warning,) = tg.setting_warnings({}, h)
        assert f"EVAL_STRIDE={h.eval_stride} >= EVAL_SEQ_LEN={h.effective_eval_seq_len}" in warning
        assert "sliding-window evaluation is off" in warning


def test_missing_tokenizer_shards_and_wrong_vocab_are_refused(tiny_data, tmp_path):
    missing_model = tmp_path / "nowhere" / "tok.model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"TOKENIZER_PATH={missing_model}")) as e:
        tg.load_tokenizer(tg.Hyperparameters(tokenizer_path=str(missing_model)))
    assert "cached_challenge_fineweb.py" in str(e.value) and "build_dataset.py" in str(e.value)
    pattern = str(tmp_path / "nowhere" / "fineweb_train_*.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)) as e:
        tg.shard_files(pattern)
    assert "cached_challenge_fineweb.py" in str(e.value)
    with pytest.raises(ValueError, match=r"VOCAB_SIZE=500 but the tokenizer .* has 384 pieces"):
        tg.load_tokenizer(
            tg.Hyperparameters(tokenizer_path=tiny_data["tokenizer_path"], vocab_size=500)
        )


def test_shards_stay_uint16_until_a_batch_is_taken(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(40000, 40100))
    assert tg.load_data_shard(tmp_path / "fineweb_train_000000.bin").dtype == np.uint16
    loader = tg.DistributedTokenLoader(str(tmp_path / "fineweb_train_*.bin"), 0, 1, CPU)
    assert loader.stream.tokens.dtype == np.uint16
    x, y = loader.next_batch(16, 8)
    assert x.dtype == torch.int64 and x[0, 0].item() == 40000 and y[1, 7].item() == 40016


def test_the_bos_id_comes_from_the_tokenizer(tiny_data):
    model = tg.build_model(small_h(), CPU, bos_id=7)
    assert model.smear.bos_id == 7
    ids = torch.tensor([[5, 7, 9, 1]])
    smear = model.smear
    with torch.no_grad():
        smear.gate.fill_(10.0)  # blend almost fully with the previous token wherever it blends
        x = torch.eye(4)[None].repeat(1, 1, 8)[:, :, :32]
        out = smear(x, ids)
    # id 7 is the BOS here
    assert torch.equal(out[0, 1], x[0, 1]) and not torch.equal(out[0, 3], x[0, 3])


def test_rotary_angles_are_fp32_at_long_positions():
    cos, sin = tg.Rotary(64, 10000.0)(4096, CPU)
    assert cos.dtype == sin.dtype == torch.float32
    t = torch.arange(4096, dtype=torch.float64)[:, None]
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(cos[0, 0].double(), torch.cos(t * inv), rtol=0, atol=2e-3)


def test_corrupt_shards_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "fineweb_train_000000.bin"
    write_shard(good, np.arange(10))
    assert tg.load_data_shard(good).tolist() == list(range(10))
    data = good.read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4").copy()
    cases = {}
    bad_magic = header.copy()
    bad_magic[0] = 12345
    cases["magic.bin"] = (bad_magic.tobytes() + data[1024:], "bad magic")
    bad_version = header.copy()
    bad_version[1] = 7
    cases["version.bin"] = (bad_version.tobytes() + data[1024:], "bad magic or version")
    cases["truncated.bin"] = (data[:-3], "truncated or corrupt")
    cases["trailing.bin"] = (data + b"\x00\x00", "truncated or corrupt")
    cases["header_only_part.bin"] = (data[:100], "bad magic")
    for name, (blob, rule) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(path))) as e:
            tg.load_data_shard(path)
        assert rule in str(e.value), name


# -----------------------------------------------------------------------------
# Data loader
# -----------------------------------------------------------------------------


@pytest.fixture
def three_shards(tmp_path):
    """Shards of 100, 37 and 50 random uint16 tokens (the whole range, to catch a signed read)."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 65536, size=n) for n in (100, 37, 50)]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    return str(tmp_path / "fineweb_train_*.bin"), np.concatenate(parts)


def test_token_stream_reads_shards_in_order_and_wraps(three_shards):
    pattern, tokens = three_shards
    stream = tg.TokenStream(pattern)
    got = np.concatenate([stream.take(n) for n in (60, 60, 1, 300, 40)])  # wraps twice
    np.testing.assert_array_equal(got, np.concatenate([tokens] * 3)[: len(got)])


def test_loader_is_deterministic_and_ranks_tile_the_one_rank_stream(three_shards):
    pattern, tokens = three_shards
    local_tokens, seq_len = 8, 4
    span = local_tokens + 1  # inputs plus the last target
    expected = np.concatenate([tokens] * 3)
    ranks = [tg.DistributedTokenLoader(pattern, r, 2, CPU) for r in range(2)]
    again = tg.DistributedTokenLoader(pattern, 1, 2, CPU)
    single = tg.DistributedTokenLoader(pattern, 0, 1, CPU)
    for call in range(14):  # 14 * 18 tokens: more than the 187 in the shards
        spans = []
        for rank, loader in enumerate(ranks):
            x, y = loader.next_batch(local_tokens, seq_len)
            assert x.shape == y.shape == (2, 4) and x.dtype == y.dtype == torch.int64
            taken = np.append(x.flatten().numpy(), y.flatten()[-1].item())
            np.testing.assert_array_equal(y.flatten().numpy(), taken[1:])
            # rank r's span follows rank r-1's: disjoint, contiguous
            start = (2 * call + rank) * span
            np.testing.assert_array_equal(taken, expected[start : start + span])
            spans.append(taken)
        x_again, y_again = again.next_batch(local_tokens, seq_len)
        assert torch.equal(x_again, x) and torch.equal(y_again, y)
        x1, y1 = single.next_batch(2 * span - 1, 2 * span - 1)
        np.testing.assert_array_equal(
            np.append(x1.flatten().numpy(), y1.flatten()[-1].item()), np.concatenate(spans)
        )


# -----------------------------------------------------------------------------
# Byte counting against SentencePiece's own decoding
# -----------------------------------------------------------------------------

SAMPLE_TEXTS = [
    "Hello world 12345 and 3.14159, year 2024",
    "café naïve résumé Ünïcödé",
    "日本語のテキスト and 日本",
    "emoji 😀🚀 mixed in",
    "multiple   spaces\tand\ttabs  between   words",
    "ﬁ ligature ① full-width ＡＢＣ",  # NFKC folds these before counting
    "x",
]


def read_shard_numpy(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=256 * 4)


def test_byte_counts_equal_utf8_bytes_of_decoded_text(tiny_data, tiny_sp):
    sp = tiny_sp
    luts = tg.build_byte_luts(sp, tiny_data["vocab_size"])
    streams = []
    for text in SAMPLE_TEXTS:
        ids = sp.encode(text)
        stream = torch.tensor([tg.BOS_ID] + ids)
        counted = int(luts.count(stream[:-1], stream[1:]).sum())
        assert counted == len(sp.decode(ids).encode("utf-8")), text
        streams.append(stream)
    pieces = [sp.id_to_piece(i) for s in streams for i in s.tolist()]
    # bare spaces and byte fallback occur
    assert "▁" in pieces and any(p.startswith("<0x") for p in pieces)
    # Several documents in one stream: the BOS targets count 0 and no space leaks across documents.
    joined = torch.cat(streams)
    assert int(luts.count(joined[:-1], joined[1:]).sum()) == decoded_document_bytes(
        sp, joined.numpy()
    )
    # Token by token: a byte piece is 1 byte (not the 6 characters of "<0xF0>"), "▁" just the space.
    byte_id, space_id, word_id = sp.piece_to_id("<0xF0>"), sp.piece_to_id("▁"), sp.piece_to_id("▁t")
    prev = torch.tensor([byte_id, 100, tg.BOS_ID, 100, tg.BOS_ID, 100])
    target = torch.tensor([byte_id, space_id, space_id, word_id, word_id, tg.BOS_ID])
    assert luts.count(prev, target).tolist() == [1, 1, 0, 2, 1, 0]


def test_byte_counts_of_the_validation_shard(tiny_data, tiny_sp):
    tokens = read_shard_numpy(Path(tiny_data["data_path"]) / "fineweb_val_000000.bin")
    luts = tg.build_byte_luts(tiny_sp, tiny_data["vocab_size"])
    t = torch.from_numpy(tokens.astype(np.int64))
    assert int(luts.count(t[:-1], t[1:]).sum()) == decoded_document_bytes(tiny_sp, tokens)


# -----------------------------------------------------------------------------
# Importing does nothing
# -----------------------------------------------------------------------------


def test_importing_train_gpt_reads_no_env_starts_nothing_and_writes_nothing(tmp_path):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    bogus = {
        "MODEL_DIM": "abc",
        "TIE_EMBEDDINGS": "yes",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "DEVICE": "cuda",
        "RUN_ID": "x",
        "LOG_DIR": str(tmp_path / "logs"),
        "ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "PATH": "/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(ROOT)],
        env=bogus,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: report[k] for k in ("reads", "dist", "cuda", "has_main")} == {
        "reads": [],
        "dist": False,
        "cuda": False,
        "has_main": True,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not any(workdir.iterdir())


# -----------------------------------------------------------------------------
# Whole runs of train_gpt.py on tiny shards
# -----------------------------------------------------------------------------

MAIN_STEPS = 20
NAN_STEP = 7  # the injected run's first bad step (1-based, as the log counts); not a logging step
NAN_WRAPPER = '''
import runpy
import torch.nn.functional as F

_cross_entropy = F.cross_entropy
calls = 0


def cross_entropy(*args, reduction="mean", **kwargs):
    """Training losses (mean reduction) are counted; training loss number {bad_call} becomes NaN."""
    global calls
    loss = _cross_entropy(*args, reduction=reduction, **kwargs)
    if reduction == "mean":
        calls += 1
        if calls == {bad_call}:
            loss = loss * float("nan")
    return loss


F.cross_entropy = cross_entropy
runpy.run_path({script!r}, run_name="__main__")
'''


@dataclasses.dataclass
class Run:
    env: dict
    proc: subprocess.CompletedProcess

    @property
    def log_path(self) -> Path:
        return Path(self.env["LOG_DIR"]) / f"{self.env['RUN_ID']}.txt"

    @property
    def log_bytes(self) -> bytes:
        return self.log_path.read_bytes()

    @property
    def lines(self) -> list[str]:
        """The log's lines after the copied source."""
        return self.log_bytes.split(b"\ncode_end\n", 1)[1].decode("utf-8").splitlines()

    @property
    def summary(self) -> dict:
        return json.loads((Path(self.env["LOG_DIR"]) / f"{self.env['RUN_ID']}.json").read_text())

    @property
    def raw_path(self) -> Path:
        return Path(self.env["ARTIFACT_DIR"]) / f"{self.env['RUN_ID']}_raw.pt"

    def raw(self) -> dict:
        return torch.load(self.raw_path, weights_only=True)

    def train_losses(self) -> dict[int, float]:
        pattern = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) ")
        return {int(m[1]): float(m[2]) for m in map(pattern.match, self.lines) if m}


class Runs:
    """Starts every run at once (two at a time); `get` waits for one."""

    def __init__(self, tiny_data: dict, root: Path):
        self.root = root
        self.script = root / "train_gpt.py"
        shutil.copyfile(ROOT / "train_gpt.py", self.script)
        self.code = self.script.read_bytes()
        wrapper = root / "inject_nan.py"
        wrapper.write_text(
            NAN_WRAPPER.format(bad_call=(NAN_STEP - 1) * 8 + 3, script=str(self.script))
        )
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.jobs: dict[str, tuple[dict, Future]] = {}
        specs = [
            ("main", 1, None, dict(ITERATIONS=MAIN_STEPS, VAL_LOSS_EVERY=10, TRAIN_LOG_EVERY=5)),
            ("ddp", 2, None, dict(ITERATIONS=3)),
            ("short", 1, None, dict(ITERATIONS=3)),
            ("warm", 1, None, dict(ITERATIONS=3, WARMUP_STEPS=5)),
            ("cap", 1, None, dict(ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=0.3, MLP_MUL=3)),
            ("nan_lr", 1, None, dict(SCALAR_LR=1e30, GRAD_CLIP_NORM=0)),
            ("nan_injected", 1, wrapper, dict(ITERATIONS=12, TRAIN_LOG_EVERY=4)),
            ("vocab", 1, None, dict(VOCAB_SIZE=500)),
            ("no_tokenizer", 1, None, dict(TOKENIZER_PATH=root / "nowhere" / "tok.model")),
            ("no_data", 1, None, dict(DATA_PATH=root / "nowhere")),
        ]
        for name, nproc, script, overrides in specs:
            env = tiny_env(tiny_data, root / name, **overrides)
            future = self.pool.submit(run_script, env, nproc, 240, False, script or self.script)
            self.jobs[name] = (env, future)

    def get(self, name: str) -> Run:
        env, future = self.jobs[name]
        return Run(env, future.result())


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    r = Runs(tiny_data, tmp_path_factory.mktemp("trainer_runs"))
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)


def ok(run: Run) -> Run:
    assert run.proc.returncode == 0, run.proc.stdout[-3000:] + run.proc.stderr[-3000:]
    return run


def test_whole_run_learns_and_logs_every_line(runs):
    run = ok(runs.get("main"))
    log = run.log_bytes
    header, rest = log.split(b"\n", 1)
    n = len(runs.code)
    assert (
        header.decode()
        == f"code_begin path:train_gpt.py bytes:{n} sha256:{hashlib.sha256(runs.code).hexdigest()}"
    )
    assert rest[:n] == runs.code and rest[n : n + 10] == b"\ncode_end\n"

    lines = run.lines
    settings = [
        line[len("setting ") :].split(":", 1) for line in lines if line.startswith("setting ")
    ]
    assert sorted(name for name, _ in settings) == sorted(tg.Hyperparameters.env_names())
    logged = dict(settings)
    assert (logged["MODEL_DIM"], logged["ITERATIONS"], logged["TIE_EMBEDDINGS"]) == (
        "64",
        "20",
        "True",
    )
    assert logged["DATA_PATH"] == run.env["DATA_PATH"] and logged["RUN_ID"] == "tiny"

    step_re = re.compile(
        r"^step:(\d+)/20 train_loss:(\d+\.\d{4}) train_time:(\d+)ms step_avg:(\d+\.\d\d)ms "
        r"tok_s:(\d+)$"
    )
    steps = [m for m in map(step_re.match, lines) if m]
    assert [int(m[1]) for m in steps] == [1, 2, 3, 4, 5, 10, 15, 20]
    for m in steps:
        s, time_ms, avg_ms, tok_s = int(m[1]), int(m[3]), float(m[4]), int(m[5])
        assert abs(avg_ms * s - time_ms) <= 0.5 + 0.005 * s
        assert tok_s == pytest.approx(1024 * s / (time_ms / 1000), rel=0.5 / max(time_ms, 1) + 1e-3)
    val_re = re.compile(
        r"^step:(\d+)/20 val_loss:(\d+\.\d{4}) val_bpb:(\d+\.\d{4}) train_time:\d+ms "
        r"step_avg:\d+\.\d\dms$"
    )
    vals = [m for m in map(val_re.match, lines) if m]
    assert [int(m[1]) for m in vals] == [0, 10, 20]
    history = run.summary["val_history"]
    assert [(h["step"], f"{h['val_loss']:.4f}", f"{h['val_bpb']:.4f}") for h in history] == [
        (int(m[1]), m[2], m[3]) for m in vals
    ]

    summary = run.summary
    for prefix in (
        "final_prequant_exact val_loss:",
        "final_int6_roundtrip_exact val_loss:",
        "Serialized model int6+zstd-3:",
        f"Code size: {n} bytes",
        "fits_16mb:true",
        f"run_complete run_id:tiny val_loss:{summary['val_loss']:.8f} "
        f"val_bpb:{summary['val_bpb']:.8f}",
    ):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert lines[-1].startswith("run_complete")
    assert summary["bytes_code"] == n and summary["steps"] == MAIN_STEPS
    assert summary["bytes_model"] == Path(summary["artifact_path"]).stat().st_size

    losses = run.train_losses()
    assert (losses[15] + losses[20]) / 2 < (losses[1] + losses[2]) / 2 - 0.5
    assert history[-1]["val_bpb"] < history[1]["val_bpb"] < history[0]["val_bpb"]
    assert summary["val_bpb"] < history[0]["val_bpb"] - 0.5


def test_run_val_bpb_is_loss_times_tokens_over_independently_counted_bytes(
    runs, tiny_data, tiny_sp
):
    summary = ok(runs.get("main")).summary
    tokens = read_shard_numpy(Path(tiny_data["data_path"]) / "fineweb_val_000000.bin")
    targets, text_bytes = len(tokens) - 1, decoded_document_bytes(tiny_sp, tokens)
    assert summary["val_tokens"] == len(tokens) and summary["scored_tokens"] == targets
    pairs = [
        (summary["roundtrip_val_loss"], summary["roundtrip_val_bpb"]),
        (summary["prequant_val_loss"], summary["prequant_val_bpb"]),
    ]
    pairs += [(h["val_loss"], h["val_bpb"]) for h in summary["val_history"]]
    for val_loss, val_bpb in pairs:
        assert val_bpb == pytest.approx(val_loss / math.log(2) * targets / text_bytes, rel=1e-12)


def test_two_processes_reach_the_weights_of_one_process_with_twice_the_accumulation(runs):
    one, two = ok(runs.get("short")), ok(runs.get("ddp"))
    assert any("world_size:1 grad_accum_steps:8" in line for line in one.lines)
    assert any("world_size:2 grad_accum_steps:4" in line for line in two.lines)
    # torchrun's variables are no typos
    assert not any(line.startswith("warning:") for line in two.lines)
    l1, l2 = one.train_losses(), two.train_losses()
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 1e-3, s
    h = tg.Hyperparameters.from_env(one.env)
    torch.manual_seed(h.seed)
    init = tg.build_model(h, CPU).state_dict()
    a, b = one.raw(), two.raw()
    assert a.keys() == b.keys() == init.keys()
    # Same data, same averaged gradients; only the summation order differs, and Muon's bf16
    # Newton-Schulz amplifies those last-bit differences into a few percent of the matrices'
    # updates.
    for name in a:
        moved = (a[name] - init[name]).norm()
        assert moved > 0, name
        assert (a[name] - b[name]).norm() <= 0.3 * moved, name
    assert two.summary["prequant_val_loss"] == pytest.approx(
        one.summary["prequant_val_loss"], abs=2e-3
    )


def test_warmup_steps_are_undone_bit_for_bit(runs):
    plain, warm = ok(runs.get("short")), ok(runs.get("warm"))
    assert any(
        re.match(r"^warmup_steps:5 warmup_time:\d+ms \(undone\)$", line) for line in warm.lines
    )
    a, b = plain.raw(), warm.raw()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert warm.summary["val_loss"] == plain.summary["val_loss"]
    assert warm.summary["prequant_val_loss"] == plain.summary["prequant_val_loss"]
    assert warm.train_losses() == plain.train_losses()


def test_wallclock_cap_stops_the_run_and_still_writes_the_final_lines(runs):
    run = ok(runs.get("cap"))
    lines, summary = run.lines, run.summary
    stops = [
        re.match(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", line)
        for line in lines
    ]
    stops = [m for m in stops if m]
    assert len(stops) == 1
    steps = int(stops[0][2])
    assert 1 <= steps == summary["steps"] < 100_000 and summary["train_time_ms"] >= 300
    times = {
        int(m[1]): int(m[2])
        for m in map(
            re.compile(r"^step:(\d+)/100000 train_loss:\S+ train_time:(\d+)ms").match, lines
        )
        if m
    }
    # stopped at the first step over
    assert times[steps] >= 300 and (steps == 1 or times[steps - 1] < 301)
    assert any(line.startswith(f"step:{steps}/100000 val_loss:") for line in lines)
    for prefix in ("final_prequant_exact", "final_int6_roundtrip_exact", "run_complete"):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert run.raw_path.is_file() and Path(summary["artifact_path"]).is_file()
    # The misspelled MLP_MUL=3 in this run's environment: one warning, in the log and the console.
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "MLP_MUL " in warnings[0] and "MLP_MULT" in warnings[0]
    assert warnings[0] in run.proc.stdout


def test_non_finite_loss_stops_the_run_naming_the_step(runs):
    run = runs.get("nan_lr")
    assert run.proc.returncode != 0
    assert (
        "non-finite training loss at step 2;" in run.proc.stderr
        and "Traceback" not in run.proc.stderr
    )
    losses = run.train_losses()
    # step 1 was fine: step 2 is the first bad one
    assert list(losses) == [1] and math.isfinite(losses[1])
    assert run.raw_path.exists()  # the (diverged) weights are kept all the same
    assert any(line.startswith("error: non-finite training loss at step 2") for line in run.lines)
    assert not any(line.startswith("run_complete") for line in run.lines)


def test_non_finite_loss_between_log_lines_is_reported_at_its_true_step(runs):
    run = runs.get("nan_injected")
    assert run.proc.returncode != 0
    assert f"non-finite training loss at step {NAN_STEP};" in run.proc.stderr
    losses = run.train_losses()
    assert list(losses) == [1, 2, 3, 4, 5] and all(map(math.isfinite, losses.values()))


@pytest.mark.parametrize(
    "name, needles",
    [
        ("vocab", ["VOCAB_SIZE=500", "384 pieces"]),
        ("no_tokenizer", ["TOKENIZER_PATH=", "nowhere/tok.model", "cached_challenge_fineweb.py"]),
        (
            "no_data",
            ["nowhere/fineweb_val_*.bin", "cached_challenge_fineweb.py", "build_dataset.py"],
        ),
    ],
)
def test_script_refuses_bad_inputs_with_a_clear_message(runs, name, needles):
    run = runs.get(name)
    assert run.proc.returncode == 1
    assert run.proc.stderr.startswith("error: ") and "Traceback" not in run.proc.stderr
    for needle in needles:
        assert needle in run.proc.stderr, (needle, run.proc.stderr)
    assert not run.raw_path.exists()


def test_reusing_a_run_id_is_refused_and_overwrites_nothing(runs):
    first = ok(runs.get("short"))
    log_before, raw_before = first.log_bytes, first.raw_path.read_bytes()
    again = run_script(first.env, check=False, script=runs.script)
    assert again.returncode == 1
    assert "RUN_ID=tiny" in again.stderr and str(first.log_path) in again.stderr
    assert first.log_bytes == log_before and first.raw_path.read_bytes() == raw_before


def test_help_lists_every_setting_and_arguments_are_refused(tmp_path):
    script = [sys.executable, str(ROOT / "train_gpt.py")]
    proc = subprocess.run([*script, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    listed = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert list(listed) == tg.Hyperparameters.env_names()
    assert listed["NUM_LAYERS"].split()[1] == "9" and listed["QAT"].split()[1] == "1"
    assert "(empty)" in listed["RUN_ID"] and "name of logs/artifacts" in listed["RUN_ID"]
    proc = subprocess.run([*script, "--iterations=5"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error: no arguments (--iterations=5)")
    assert "--help" in proc.stderr and list(tmp_path.iterdir()) == []  # nothing ran
