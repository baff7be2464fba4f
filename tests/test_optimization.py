"""Weight decay, EMA, MuonEq-R, Polar Express, the schedule's MIN_LR and WARMDOWN_FRAC, late QAT
under torch.compile: each against a hand-written reference."""

from __future__ import annotations

import functools
import json
import math
import re

import pytest
import torch
from torch import nn

import train_gpt as tg
from conftest import CPU, run_script, small_hparams, tiny_env

small_h = functools.partial(small_hparams, num_layers=2)


def reference_newton_schulz(g: torch.Tensor, coefficients, steps: int = 5) -> torch.Tensor:
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    tall = g.shape[0] > g.shape[1]
    x = x.T if tall else x
    for i in range(steps):
        a, b, c = coefficients[i] if i < len(coefficients) else coefficients[-1]
        x = a * x + (b * (x @ x.T) + c * (x @ x.T) @ (x @ x.T)) @ x
    return x.T if tall else x


def muon_step(p0, grad, **kwargs) -> torch.Tensor:
    p = nn.Parameter(p0.clone())
    opt = tg.Muon([{"params": [p]}], lr=0.1, momentum=0.9, backend_steps=5, **kwargs)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_muon_weight_decay_row_norm_and_polar_express_against_a_hand_step(shape):
    gen = torch.Generator().manual_seed(0)
    p0, grad = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    nesterov = grad + 0.9 * grad  # first step: the buffer is the gradient
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    rows = nesterov / nesterov.norm(dim=1, keepdim=True)
    for kwargs, update, decay in [
        ({}, reference_newton_schulz(nesterov, tg.NEWTON_SCHULZ["quintic"]), 1.0),
        (
            dict(weight_decay=0.5),
            reference_newton_schulz(nesterov, tg.NEWTON_SCHULZ["quintic"]),
            1 - 0.1 * 0.5,
        ),
        (dict(row_norm=True), reference_newton_schulz(rows, tg.NEWTON_SCHULZ["quintic"]), 1.0),
        (dict(ns="polar"), reference_newton_schulz(nesterov, tg.NEWTON_SCHULZ["polar"]), 1.0),
    ]:
        expected = p0 * decay - 0.1 * (update.float() * scale).bfloat16().float()
        torch.testing.assert_close(
            muon_step(p0, grad, **kwargs), expected, rtol=0, atol=1e-6, msg=str(kwargs)
        )


def test_polar_express_puts_singular_values_near_one():
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 0, 32)
    spread = {}
    for name in ("quintic", "polar"):
        s = torch.linalg.svdvals(
            tg.zeropower_via_newtonschulz5(g, 5, coefficients=tg.NEWTON_SCHULZ[name]).float()
        )
        assert s.min() > 0.5 and s.max() < 1.25, (name, s.min(), s.max())
        spread[name] = (s.max() - s.min()).item()
    assert spread["polar"] < spread["quintic"]  # Polar Express lands closer to 1 in as many steps
    assert len(tg.NEWTON_SCHULZ["polar"]) == 5 and len(set(tg.NEWTON_SCHULZ["polar"])) == 5


def test_adam_groups_decay_decoupled_with_the_scheduled_lr():
    h = small_h(embed_wd=0.3, adam_wd=0.2, muon_wd=0.1, tie_embeddings=False)
    model = tg.build_model(h, CPU)
    opts = tg.build_optimizers(h, model, tg.zeropower_via_newtonschulz5, fused=False)
    decays = {id(p): g["weight_decay"] for o in opts for g in o.param_groups for p in g["params"]}
    assert decays[id(model.tok_emb.weight)] == 0.3 and decays[id(model.lm_head.weight)] == 0.2
    assert (
        decays[id(model.blocks[0].attn_scale)] == 0.2
        and decays[id(model.blocks[0].mlp.fc.weight)] == 0.1
    )
    # One AdamW step by hand: the decay uses the group's lr as set by the schedule.
    p = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(2)))
    p0, g = p.detach().clone(), torch.randn(5, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(
        [{"params": [p], "lr": 0.5}], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.2
    )
    opt.param_groups[0]["lr"] = 0.5 * 0.25  # lr_scale 0.25
    p.grad = g
    opt.step()
    lr = 0.125
    m_hat, v_hat = g, g * g  # (1 - beta) g / (1 - beta), first step
    torch.testing.assert_close(p.detach(), p0 * (1 - lr * 0.2) - lr * m_hat / (v_hat.sqrt() + 1e-8))


def test_ema_is_an_exponential_average_of_every_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = tg.EMA(model, decay=0.9)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.full_like(p, 0.1 * (step + 1)))
        ema.update()
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, t in ema.state_dict().items():
        torch.testing.assert_close(t, expected[n], rtol=1e-6, atol=1e-7)
    assert set(ema.state_dict()) == set(model.state_dict())


# -----------------------------------------------------------------------------
# Schedule
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, elapsed_ms, expected",
    [
        (0, 0.0, 1.0),
        (600, 600.0, 1.0),
        (700, 700.0, 0.1 + 0.9 * 300 / 400),
        (900, 900.0, 0.1 + 0.9 * 100 / 400),
        (1000, 1000.0, 0.1),
        (1200, 1200.0, 0.1),
    ],
)
def test_warmdown_fraction_and_min_lr_by_steps(step, elapsed_ms, expected):
    got = tg.lr_multiplier(
        step,
        elapsed_ms,
        iterations=1000,
        warmdown_iters=3000,
        max_wallclock_ms=None,
        warmdown_frac=0.4,
        min_lr=0.1,
    )
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "step, elapsed_ms, expected",
    [
        (10, 10_000.0, 1.0),
        (300, 150_000.0, 1.0),
        (400, 160_000.0, 0.2 + 0.8 * 40_000 / 50_000),
        (500, 190_000.0, 0.2 + 0.8 * 10_000 / 50_000),
        (600, 200_000.0, 0.2),
        (700, 230_000.0, 0.2),
    ],
)
def test_warmdown_fraction_and_min_lr_by_wall_clock(step, elapsed_ms, expected):
    got = tg.lr_multiplier(
        step,
        elapsed_ms,
        iterations=20_000,
        warmdown_iters=3000,
        max_wallclock_ms=200_000.0,
        warmdown_frac=0.25,
        min_lr=0.2,
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_min_lr_floors_the_step_count_warmdown_too():
    kw = dict(iterations=100, warmdown_iters=20, max_wallclock_ms=None, min_lr=0.5)
    assert [tg.lr_multiplier(s, 0.0, **kw) for s in (0, 80, 90, 99)] == pytest.approx(
        [1.0, 1.0, 0.5 + 0.5 * 10 / 20, 0.5 + 0.5 * 1 / 20]
    )
    assert tg.lr_multiplier(
        95, 9500.0, iterations=10**6, warmdown_iters=10, max_wallclock_ms=10_000.0, min_lr=0.5
    ) == pytest.approx(0.5 + 0.5 * 500 / (10 * 100))


def test_schedule_settings_are_checked():
    for env, message in [
        ({"MIN_LR": "1.5"}, "MIN_LR=1.5 must be in [0, 1]"),
        ({"WARMDOWN_FRAC": "-0.1"}, "WARMDOWN_FRAC=-0.1 must be in [0, 1]"),
        ({"EMA_DECAY": "1"}, "EMA_DECAY=1.0 must be in [0, 1)"),
        ({"MUON_NS": "cubic"}, "MUON_NS='cubic' must be one of quintic, polar"),
        ({"MUON_WD": "-1"}, "MUON_WD=-1.0 must not be negative"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tg.Hyperparameters.from_env(env)


# -----------------------------------------------------------------------------
# Late QAT under torch.compile
# -----------------------------------------------------------------------------


def test_late_qat_switches_the_compiled_forward_without_a_recompile():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    h = small_h()
    model = tg.build_model(h, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    plain = tg.build_model(small_h(qat=False), CPU)
    plain.load_state_dict(model.state_dict())
    on_grid = tg.build_model(small_h(qat=False), CPU)  # the int6 matrices on the export's grid
    exported = tg.dequantize_state_dict(tg.quantize_state_dict(model.state_dict(), h))
    on_grid.load_state_dict(
        {
            k: exported[k] if tg.export_kind(k, v, tg.Hyperparameters()) == "int6" else v
            for k, v in model.state_dict().items()
        }
    )
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    model.train()
    model.set_qat_active(False)
    off = compiled(ids, ids)  # the first call compiles
    graphs = counters["stats"]["unique_graphs"]
    assert off.item() == pytest.approx(plain.train()(ids, ids).item(), rel=1e-6)
    model.set_qat_active(True)
    on = compiled(ids, ids)
    assert on.item() == pytest.approx(on_grid.train()(ids, ids).item(), rel=1e-6)
    assert model(ids, ids).item() == on_grid(ids, ids).item()  # eager: bit for bit
    assert abs(on.item() - off.item()) > 1e-4  # the two really differ
    model.set_qat_active(False)
    assert compiled(ids, ids).item() == off.item()
    assert counters["stats"]["unique_graphs"] == graphs  # the switch cost no compile


def test_late_qat_switches_on_when_the_lr_first_drops_below_the_threshold(tiny_data, tmp_path):
    env = tiny_env(
        tiny_data,
        tmp_path,
        ITERATIONS=20,
        WARMDOWN_ITERS=10,
        LATE_QAT_THRESHOLD=0.35,
        MIN_LR=0.1,
        EMA_DECAY=0.9,
        MUON_WD=0.05,
        ADAM_WD=0.01,
        EMBED_WD=0.02,
        MUON_ROW_NORM=1,
        MUON_NS="polar",
    )
    proc = run_script(env)
    lr = [
        tg.lr_multiplier(
            s, 0.0, iterations=20, warmdown_iters=10, max_wallclock_ms=None, min_lr=0.1
        )
        for s in range(20)
    ]
    first = next(s for s, m in enumerate(lr) if m < 0.35)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("late_qat_on")]
    assert line.startswith(f"late_qat_on step:{first} ")
    log = (tmp_path / "logs" / "tiny.txt").read_text()
    raw = float(re.search(r"^final_prequant_raw_exact val_loss:(\S+)", log, re.M)[1])
    summary = json.loads((tmp_path / "logs" / "tiny.json").read_text())
    assert raw != summary["prequant_val_loss"]  # the EMA's weights are scored and exported
    ema_weights = torch.load(tmp_path / "artifacts" / "tiny_raw.pt", weights_only=True)
    again = tiny_env(
        tiny_data,
        tmp_path,
        RUN_ID="again",
        ITERATIONS=0,
        INIT_CHECKPOINT=str(tmp_path / "artifacts" / "tiny_raw.pt"),
        EMA_DECAY=0.9,
    )
    run_script(again)
    # the raw checkpoint re-exports byte for byte
    assert (tmp_path / "artifacts" / "again.int6.ptz").read_bytes() == (
        tmp_path / "artifacts" / "tiny.int6.ptz"
    ).read_bytes()
    assert set(ema_weights) == set(
        tg.build_model(tg.Hyperparameters.from_env(env), CPU).state_dict()
    )


def test_one_and_two_processes_agree_with_every_switch_on(tiny_data, tmp_path):
    switches = dict(
        ITERATIONS=3,
        MIN_LR=0.1,
        WARMDOWN_FRAC=0.5,
        EMA_DECAY=0.5,
        MUON_WD=0.05,
        ADAM_WD=0.01,
        EMBED_WD=0.02,
        MUON_ROW_NORM=1,
        MUON_NS="polar",
        LATE_QAT_THRESHOLD=0.9,
    )
    one = tiny_env(tiny_data, tmp_path / "one", **switches)
    two = tiny_env(tiny_data, tmp_path / "two", **switches)
    run_script(one)
    run_script(two, nproc=2)
    s1 = json.loads((tmp_path / "one" / "logs" / "tiny.json").read_text())
    s2 = json.loads((tmp_path / "two" / "logs" / "tiny.json").read_text())
    # Same data and averaged gradients; all-reduce order and bf16 Newton-Schulz move the last bits.
    assert s2["prequant_val_loss"] == pytest.approx(s1["prequant_val_loss"], abs=2e-3)
    assert math.isfinite(s1["val_loss"]) and s1["steps"] == s2["steps"] == 3
