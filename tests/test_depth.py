"""Depth recurrence (looped layers that switch on mid-run) and parallel residual lanes."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

import train_gpt as tg
from conftest import assert_causal, randomized, run_script, small_hparams, tiny_env

small_h = functools.partial(small_hparams, num_layers=6)


@pytest.mark.parametrize(
    "layers, start, end, loops, encoder, decoder",
    [
        (11, 3, 5, 2, [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]),
        (9, 4, 5, 2, [0, 1, 2, 3, 4, 5], [4, 5, 4, 5, 6, 7, 8]),
        (9, 4, 5, 1, [0, 1, 2, 3, 4], [5, 4, 5, 6, 7, 8]),
    ],
)
def test_virtual_layers_match_the_hand_table(layers, start, end, loops, encoder, decoder):
    h = small_h(num_layers=layers, num_loops=loops, loop_start=start, loop_end=end)
    assert tg.virtual_layers(h, True) == (encoder, decoder)
    plain = list(range(layers))
    assert tg.virtual_layers(h, False) == (plain[: layers // 2], plain[layers // 2 :])
    model = tg.GPT(h)
    assert model.num_skips == min(len(encoder), len(decoder)) == model.skip_weights.shape[0]


def test_looped_forward_runs_the_shared_layers_again():
    h = small_h(num_loops=1, loop_start=2, loop_end=3, smear_gate="0")
    model = randomized(tg.GPT(h), std=0.2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    # slow reference: layers 0 1 2 3 | 2 3 4 5, skips paired by order
    x = x0 = tg.rms_norm(model.tok_emb(ids))
    outs = []
    for i in (0, 1, 2, 3):
        x = model.blocks[i](x, x0)
        outs.append(x)
    for j, i in enumerate((2, 3, 4, 5)):
        x = x + model.skip_weights[j] * outs.pop()
        x = model.blocks[i](x, x0)
    model.looping = True
    torch.testing.assert_close(model.hidden(ids), tg.rms_norm(x))
    model.looping = False
    assert not torch.allclose(model.hidden(ids), tg.rms_norm(x))


def test_parallel_lanes_against_a_slow_reference():
    h = small_h(parallel_residual_start=4, smear_gate="0")
    model = randomized(tg.GPT(h), std=0.2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    x = x0 = tg.rms_norm(model.tok_emb(ids))
    skips = []
    for i in range(3):
        x = model.blocks[i](x, x0)
        skips.append(x)
    x = model.blocks[3](x + model.skip_weights[0] * skips.pop(), x0)
    lane0 = lane1 = x
    for j, i in enumerate((4, 5)):
        lane0 = lane0 + model.skip_weights[j + 1] * skips.pop()  # the skip goes to lane 0
        block, k = model.blocks[i], i - 4
        mix = block.resid_mix
        attn_out = block.attn_scale * block.attn(tg.rms_norm(mix[0] * lane0 + mix[1] * x0))
        mlp_out = block.mlp_scale * block.mlp(tg.rms_norm(lane1))
        r, post = model.lane_resid[k], model.lane_post[k]
        lane0, lane1 = (
            r[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out,
            r[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out,
        )
    torch.testing.assert_close(model.hidden(ids), tg.rms_norm((lane0 + lane1) / 2))
    groups = {n: tg.optimizer_group(n, p) for n, p in model.named_parameters() if "lane_" in n}
    assert groups == {"lane_resid": "scalar", "lane_post": "scalar"}
    assert all(
        tg.export_kind(n, p, tg.Hyperparameters()) == "float"
        for n, p in model.named_parameters()
        if "lane_" in n
    )


def test_causality_with_loops_and_lanes():
    h = small_h(num_loops=2, loop_start=1, loop_end=2, parallel_residual_start=4)
    model = randomized(tg.GPT(h), std=0.2).eval()
    model.looping = True
    ids = torch.randint(2, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    assert_causal(model, ids)


def test_bad_loop_and_lane_settings_are_refused():
    for env, message in [
        ({"NUM_LOOPS": "1", "LOOP_START": "5", "LOOP_END": "3"}, "NUM_LOOPS=1 needs 0 <= "),
        ({"NUM_LOOPS": "1", "LOOP_END": "9"}, "LOOP_END=9 < NUM_LAYERS=9"),
        ({"PARALLEL_RESIDUAL_START": "2"}, "must be a decoder layer"),
        (
            {"PARALLEL_RESIDUAL_START": "5", "NUM_LOOPS": "1", "LOOP_START": "4", "LOOP_END": "5"},
            "after the looped ones",
        ),
        ({"ENABLE_LOOPING_AT": "1.5"}, "ENABLE_LOOPING_AT=1.5 must be in [0, 1]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tg.Hyperparameters.from_env(env)


def test_compiled_looping_switches_on_without_a_compile(tiny_data, tmp_path):
    env = tiny_env(
        tiny_data,
        tmp_path,
        COMPILE=1,
        NUM_LAYERS=2,
        NUM_LOOPS=1,
        LOOP_START=0,
        LOOP_END=0,
        ENABLE_LOOPING_AT=0.5,
        ITERATIONS=6,
        WARMUP_STEPS=2,
        GRAD_ACCUM_STEPS=1,
        FINAL_EVAL=0,
        OMP_NUM_THREADS=2,
    )
    proc = run_script(env, timeout=900)
    on = re.search(
        r"^looping_on step:3 train_time:(\d+)ms virtual_layers:\[0, 0, 1\] graphs:(\d+)$",
        proc.stdout,
        re.M,
    )
    done = re.search(r"^training_done steps:6 train_time:(\d+)ms graphs:(\d+) ", proc.stdout, re.M)
    assert on and done, proc.stdout[-3000:]
    assert int(done[2]) == int(on[2])  # both layer orders were compiled during the warm-up
    # the times that price the loops: before and after the switch
    assert 0 < int(on[1]) < int(done[1])


def test_one_and_two_processes_agree_with_loops_and_lanes(tiny_data, tmp_path):
    switches = dict(
        NUM_LAYERS=4,
        NUM_LOOPS=1,
        LOOP_START=1,
        LOOP_END=1,
        ENABLE_LOOPING_AT=0.5,
        PARALLEL_RESIDUAL_START=3,
        ITERATIONS=4,
    )
    summaries = []
    for nproc in (1, 2):
        env = tiny_env(tiny_data, tmp_path / str(nproc), **switches)
        proc = run_script(env, nproc=nproc)
        assert re.search(
            r"looping_on step:2 train_time:\d+ms virtual_layers:\[0, 1, 1, 2, 3\]", proc.stdout
        )
        summaries.append(json.loads((tmp_path / str(nproc) / "logs" / "tiny.json").read_text()))
    assert summaries[1]["prequant_val_loss"] == pytest.approx(
        summaries[0]["prequant_val_loss"], abs=2e-3
    )
