"""Technique switches: each against a slow, plainly correct reference; off = the stored outputs."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch

import switches_off
import train_gpt as tg
from conftest import CPU, ROOT, assert_causal, randomized, run_script, small_hparams, tiny_env

ALL_ON = dict(
    xsa_last_n=3,
    rope_dims=4,
    ln_scale=True,
    mlp_act="leaky_relu2",
    skip_gates=True,
    attn_gate="dense",
    bigram_buckets=37,
    bigram_dim=8,
    ortho_init="scaled",
)
small_h = functools.partial(small_hparams, num_layers=4)


def test_every_switch_off_reproduces_the_stored_outputs():
    assert (
        switches_off.differences(
            json.loads(switches_off.FIXTURE.read_text()), switches_off.compute()
        )
        == []
    )


# -----------------------------------------------------------------------------
# Each technique against a slow reference
# -----------------------------------------------------------------------------


def test_xsa_leaves_no_component_along_the_tokens_own_value(tmp_path):
    h = small_h(xsa_last_n=1, num_heads=6, num_kv_heads=2, model_dim=48)
    attn = randomized(tg.CausalSelfAttention(h, layer_idx=3))
    assert attn.xsa and not tg.CausalSelfAttention(h, layer_idx=2).xsa
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(48, dtype=torch.float64))  # expose each head's output
    x = torch.randn(2, 9, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = attn(x).view(2, 9, 6, 8)  # (B, T, H, D)
    v = attn.c_v(x).view(2, 9, 2, 8)
    # Slow reference: plain attention, each query head on its kv head, then the projection removed.
    q = tg.rms_norm(attn.c_q(x).view(2, 9, 6, 8).transpose(1, 2))
    k = tg.rms_norm(attn.c_k(x).view(2, 9, 2, 8).transpose(1, 2))
    cos, sin = attn.rotary(9, CPU)
    q = tg.apply_rotary(q, cos.double(), sin.double()) * attn.q_gain[None, :, None, None]
    k = tg.apply_rotary(k, cos.double(), sin.double())
    expected = torch.empty(2, 9, 6, 8, dtype=torch.float64)
    for b in range(2):
        for head in range(6):
            kv = head // 3
            scores = q[b, head] @ k[b, kv].T / math.sqrt(8)
            scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
            out = scores.softmax(-1) @ v[b, :, kv]
            for t in range(9):
                unit = v[b, t, kv] / v[b, t, kv].norm()
                expected[b, t, head] = out[t] - (out[t] @ unit) * unit
                assert abs(float(y[b, t, head].detach() @ unit.detach())) < 1e-10
    # q and k are normed and rotated in fp32
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_partial_rope_rotates_only_the_first_dims_and_equals_full_rope_on_them():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = tg.Rotary(6, 10000.0)(5, CPU)
    out = tg.apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 6:], x[..., 6:])
    assert torch.equal(out[..., :6], tg.apply_rotary(x[..., :6].contiguous(), cos, sin))
    angle = torch.arange(5, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, 6, 2) / 6)
    for i in range(3):  # pair (i, i + 3) turns by the position's angle
        a, b = x[..., i].double(), x[..., i + 3].double()
        torch.testing.assert_close(
            out[..., i].double(), a * angle[:, i].cos() + b * angle[:, i].sin()
        )
        torch.testing.assert_close(
            out[..., i + 3].double(), b * angle[:, i].cos() - a * angle[:, i].sin()
        )


def test_ln_scale_factors():
    h = small_h(ln_scale=True)
    x = torch.randn(2, 3, 32)
    for i in range(4):
        block = tg.Block(h, i)
        assert block.ln_scale == 1 / math.sqrt(i + 1)
        torch.testing.assert_close(block.norm(x), tg.rms_norm(x) / math.sqrt(i + 1))
    assert tg.Block(small_h(), 3).ln_scale is None


def test_leaky_relu_squared():
    mlp = randomized(tg.MLP(small_h(mlp_act="leaky_relu2", leaky_slope=0.25)))
    x = torch.randn(3, 32, dtype=torch.float64)
    hidden = x @ mlp.fc.weight.T
    act = torch.where(hidden > 0, hidden, 0.25 * hidden) ** 2
    torch.testing.assert_close(mlp(x), act @ mlp.proj.weight.T)


def test_skip_gates_blend_skip_and_stream_by_a_sigmoid():
    h = small_h(skip_gates=True, smear_gate="0")
    model = randomized(tg.GPT(h))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    x = x0 = tg.rms_norm(model.tok_emb(ids))  # slow reference of the U-Net with gated skips
    skips = []
    for i, block in enumerate(model.blocks):
        if i >= 2:
            g = torch.sigmoid(model.skip_gates[i - 2])
            x = g * x + (1 - g) * model.skip_weights[i - 2] * skips.pop()
        x = block(x, x0)
        if i < 2:
            skips.append(x)
    torch.testing.assert_close(model.hidden(ids), tg.rms_norm(x))


def test_bigram_hash_indices():
    bigram = tg.BigramHash(101, 4, 8, bos_id=1)
    ids = torch.tensor([[5, 9, 1, 7, 7, 1000], [1, 3, 4, 1, 1, 2]])
    got = bigram.indices(ids)
    for b in range(2):
        for t in range(6):
            cur, prev = int(ids[b, t]), int(ids[b, t - 1])
            want = 100 if t == 0 or cur == 1 else ((36313 * cur) ^ (27191 * prev)) % 100
            assert got[b, t] == want, (b, t)
    assert bigram(ids).abs().sum() == 0  # the table starts at zero
    out = tg.GPT(small_h(bigram_buckets=101, bigram_dim=4)).bigram
    assert isinstance(out, tg.BigramHash) and out.embed.weight.shape == (101, 4)


def test_orthogonal_init():
    h = small_h(ortho_init="scaled", mlp_mult=3)
    model = tg.GPT(h)
    for name, module in model.blocks.named_modules():
        if isinstance(module, tg.CastedLinear):
            w = module.weight.double()
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            scale = 1 / (2 * h.num_layers) if name.endswith(".proj") else 1.0
            torch.testing.assert_close(
                gram, scale * torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-5
            )


def test_eleven_layers_make_a_five_six_u_net():
    model = tg.GPT(small_h(num_layers=11))
    assert (
        model.num_encoder_layers,
        len(model.blocks) - model.num_encoder_layers,
        model.num_skips,
    ) == (5, 6, 5)


def test_causality_with_every_switch_on():
    model = randomized(tg.GPT(small_h(**ALL_ON)), std=0.2).eval()
    ids = torch.randint(2, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    ids[0, 5] = tg.BOS_ID
    assert_causal(model, ids)


def test_every_parameter_has_one_optimizer_group_and_int6_means_fake_quantized():
    h = small_h(**ALL_ON, tie_embeddings=False)
    model = tg.build_model(h, CPU)
    optimizers = tg.build_optimizers(h, model, tg.zeropower_via_newtonschulz5, fused=False)
    grouped = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    expect = {
        "bigram.embed.weight": "embed",
        "bigram.proj.weight": "matrix",
        "bigram.scale": "scalar",
        "skip_gates": "scalar",
        "blocks.0.attn.attn_gate": "scalar",
        "blocks.1.mlp.fc.weight": "matrix",
    }
    names = dict(model.named_parameters())
    for name, group in expect.items():
        assert tg.optimizer_group(name, names[name]) == group, name
    fake_quantized = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, tg.CastedLinear) and m.qat is not None
    }
    int6 = {n for n, p in model.state_dict().items() if tg.export_kind(n, p, h) == "int6"}
    assert int6 == fake_quantized and "bigram.proj.weight" in int6
    assert tg.export_kind("blocks.2.attn.attn_gate", names["blocks.2.attn.attn_gate"], h) == "int8"


def test_bad_technique_settings_are_refused():
    for env, message in [
        ({"XSA_LAST_N": "12", "NUM_LAYERS": "11"}, "XSA_LAST_N=12 must be in 0..NUM_LAYERS=11"),
        ({"ROPE_DIMS": "7"}, "ROPE_DIMS=7 must be even"),
        ({"ROPE_DIMS": "80"}, "at most the head size 64"),
        ({"MLP_ACT": "gelu"}, "MLP_ACT='gelu' must be one of relu2, leaky_relu2"),
        ({"BIGRAM_BUCKETS": "1"}, "BIGRAM_BUCKETS=1 must be 0"),
        ({"PRESET": "best"}, "PRESET='best' is not one of: pr65, pr102, pr114, frontier"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tg.Hyperparameters.from_env(env)


# -----------------------------------------------------------------------------
# Presets
# -----------------------------------------------------------------------------


def readme_presets() -> dict[str, dict[str, str]]:
    """The README's preset table: a row per setting, a column per preset (blank = the default)."""
    lines = (
        (ROOT / "README.md")
        .read_text()
        .split("\n## Presets\n", 1)[1]
        .split("\n## ", 1)[0]
        .splitlines()
    )
    rows = [line for line in lines if line.startswith("| `")]
    header = next(line for line in lines if line.startswith("| setting"))
    names = [c.strip() for c in header.strip("|").split("|")][1:]
    table = {name: {} for name in names}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name, cell in zip(names, cells[1:], strict=True):
            if cell:
                table[name][cells[0].strip("`")] = cell.strip("`")
    return table


def test_each_preset_resolves_to_its_documented_table():
    documented = readme_presets()
    assert set(documented) == set(tg.PRESETS) - {""}
    default = tg.Hyperparameters().as_env()

    def shown(v):
        return str(int(v) if isinstance(v, bool) else v)

    for name, values in documented.items():
        resolved = tg.Hyperparameters.from_env({"PRESET": name}).as_env()
        for key, value in resolved.items():
            assert shown(value) == values.get(
                key, shown(default[key]) if key != "PRESET" else name
            ), (name, key)
        assert set(values) <= set(resolved)


def test_an_explicit_variable_wins_over_the_preset():
    h = tg.Hyperparameters.from_env(
        {"PRESET": "pr114", "TRAIN_SEQ_LEN": "1024", "EVAL_STRIDE": "32"}
    )
    assert (h.preset, h.train_seq_len, h.eval_stride, h.grad_clip_norm) == ("pr114", 1024, 32, 0.3)
    assert tg.Hyperparameters.from_env({}) == tg.Hyperparameters()


def test_a_run_with_a_preset_and_every_switch_logs_and_summarizes_it(tiny_data, tmp_path):
    sys_path = str(ROOT / "records")
    import sys

    sys.path.insert(0, sys_path)
    import record_tools

    env = tiny_env(
        tiny_data,
        tmp_path,
        PRESET="frontier",
        NUM_LAYERS=6,
        TRAIN_SEQ_LEN=64,
        TRAIN_BATCH_TOKENS=1024,
        XSA_LAST_N=2,
        BIGRAM_BUCKETS=64,
        BIGRAM_DIM=16,
        ORTHO_INIT="scaled",
        ITERATIONS=3,
        EVAL_STRIDE=32,
        LOOP_START=1,
        LOOP_END=2,
        PARALLEL_RESIDUAL_START=4,
        GPTQ_CALIB_TOKENS=2048,
    )
    proc = run_script(env)
    assert re.search(r"^run_id:tiny preset:frontier ", proc.stdout, re.M)
    summary = json.loads((tmp_path / "logs" / "tiny.json").read_text())
    assert summary["preset"] == "frontier" and summary["hyperparameters"]["ROPE_DIMS"] == 16
    assert summary["hyperparameters"]["NUM_LAYERS"] == 6  # explicit wins
    # 2/3 >= 0.35
    assert re.search(
        r"looping_on step:2 train_time:\d+ms virtual_layers:\[0, 1, 2, 1, 2, 1, 2, 3, 4, 5\]",
        proc.stdout,
    )
    table = record_tools.sweep_table(tmp_path / "logs")
    assert (
        table.splitlines()[0].split()[:2] == ["run_id", "preset"]
        and "frontier" in table.splitlines()[2]
    )
