"""Score-first test-time training (TTT): legal by construction, and proven so.

The rules: every validation target is scored once, under the full softmax, before any update that
used it; one pass; the last chunk is never trained on. An instrumented pass records, for every
scored target, how many updates had happened when it was scored, and for every update, which target
positions carried its gradient. The arithmetic is checked against a slow per-target reference;
TTT_LR=0 against the plain sliding-window score; the script against itself across process counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train_gpt as tg
from conftest import CPU, ShapeRecorder, log_events, random_gpt, run_script, small_hparams, tiny_env

TTT_LINE = re.compile(
    r"^final_ttt_exact val_loss:(\S+) val_bpb:(\S+) scored_tokens:(\d+) eval_time:(\d+)ms "
    r"graphs:(\d+) compile_time:(\d+)ms$",
    re.M,
)
RUN_SETTINGS = dict(
    ITERATIONS=40,
    TRAIN_SEQ_LEN=64,
    EVAL_STRIDE=16,
    EVAL_BATCH_SEQS=32,
    GRAD_ACCUM_STEPS=1,
    TRAIN_BATCH_TOKENS=512,
    TRAIN_LOG_EVERY=20,
    TTT_ENABLED=1,
    TTT_CHUNK_TOKENS=4096,
    TTT_LR=0.01,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is much faster here


def settings(tiny_data, **ttt) -> tg.Hyperparameters:
    return small_hparams(num_layers=2, vocab_size=tiny_data["vocab_size"], ttt_enabled=True, **ttt)


def random_stream(tiny_data, num_targets: int) -> torch.Tensor:
    """Uniform random ids: each (w + 1)-token window is unique, so its tokens name its position."""
    gen = torch.Generator().manual_seed(2)
    return torch.randint(
        4, tiny_data["vocab_size"], (num_targets + 1,), generator=gen, dtype=torch.int32
    )


# -----------------------------------------------------------------------------
# Score before update, proven on an instrumented pass
# -----------------------------------------------------------------------------


class TrainingRecorder(torch.nn.Module):
    """The model; each forward with gradients records, per row, the window's start (found from its
    tokens) and, once backward has run, the target positions whose loss received a gradient.
    Forwards without gradients must come from evaluate() (the scoring), those with gradients
    never."""

    def __init__(self, model, tokens: torch.Tensor, w: int):
        super().__init__()
        self.model, self.w = model, w
        self.where = {tuple(tokens[s : s + w + 1].tolist()): s for s in range(tokens.numel() - w)}
        # per forward with gradients: (window starts, positions with a nonzero loss gradient)
        self.rows = []
        self.scoring = False  # inside evaluate()

    def forward(self, x, y, **kwargs):
        assert self.scoring != torch.is_grad_enabled()
        losses = self.model(x, y, **kwargs)
        if torch.is_grad_enabled():
            # every position of the window
            assert kwargs["score_last"] == self.w and y.shape == x.shape
            starts = [
                self.where[tuple(xr.tolist()) + (int(yr[-1]),)] for xr, yr in zip(x, y, strict=True)
            ]
            record = {"starts": starts, "trained": []}
            self.rows.append(record)
            losses.register_hook(
                lambda g: record["trained"].extend(
                    starts[i] + j for i, j in (g != 0).nonzero().tolist()
                )
            )
        return losses


def instrumented_pass(monkeypatch, tokens, luts, h, *, seq_len, stride, batch_seqs):
    """Run evaluate_ttt recording the windows each evaluate() scores and the updates (SGD steps)."""
    n = tokens.numel() - 1
    w = min(seq_len, n)
    recorder = TrainingRecorder(random_gpt(h), tokens, w)
    updates = []  # per SGD step: the targets that carried its gradient, and those its windows held
    # per target: updates done when it was scored (once, if all is well)
    scored_at = [[] for _ in range(n)]
    chunks = []  # per evaluate() call: the targets it scored
    real_evaluate = tg.evaluate

    def evaluate(model, tokens, luts, **kwargs):
        targets = [t for start, k in kwargs["windows"] for t in range(start + w - k, start + w)]
        for t in targets:
            scored_at[t].append(len(updates))
        chunks.append(targets)
        recorder.scoring = True
        try:
            return real_evaluate(model, tokens, luts, **kwargs)
        finally:
            recorder.scoring = False

    def on_step(opt, args, kwargs):
        rows, recorder.rows[:] = list(recorder.rows), []
        updates.append(
            {
                "trained": [t for r in rows for t in r["trained"]],
                "held": {t for r in rows for s in r["starts"] for t in range(max(s - 1, 0), s + w)},
            }
        )

    monkeypatch.setattr(tg, "evaluate", evaluate)
    handle = register_optimizer_step_pre_hook(on_step)
    try:
        result = tg.evaluate_ttt(
            recorder, tokens, luts, h, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs
        )
    finally:
        handle.remove()
    return result, scored_at, chunks, updates


@pytest.mark.parametrize(
    "seq_len,stride,chunk_tokens,batch_seqs",
    [
        (16, 4, 64, 3),  # chunks of 4-5 training windows in micro-batches of 3
        (16, 5, 50, 64),  # chunk ends that are no window's end
        (16, 0, 40, 2),  # plain (non-overlapping) windows
        (16, 4, 3, 4),  # chunks smaller than the stride: one window each
        (16, 4, 10_000, 4),  # one chunk: scored, never trained on
    ],
)
def test_every_update_uses_only_targets_already_scored(
    tiny_data, luts, monkeypatch, seq_len, stride, chunk_tokens, batch_seqs
):
    epochs, n = 2, 300
    tokens = random_stream(tiny_data, n)
    h = settings(tiny_data, ttt_chunk_tokens=chunk_tokens, ttt_lr=0.05, ttt_epochs=epochs)
    result, scored_at, chunks, updates = instrumented_pass(
        monkeypatch, tokens, luts, h, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs
    )
    # Every target scored exactly once, over the whole split.
    assert [len(u) for u in scored_at] == [1] * n
    assert result.scored_tokens == n
    scored_at = [u[0] for u in scored_at]
    # One pass in order: chunks of consecutive targets; after each but the last, `epochs` updates.
    assert [t for c in chunks for t in c] == list(range(n))
    assert all(c == list(range(c[0], c[-1] + 1)) for c in chunks)
    # a chunk: the windows whose last target is in it
    last_chunk_of = [c[-1] // chunk_tokens for c in chunks]
    assert last_chunk_of == sorted(set(last_chunk_of))
    assert [scored_at[c[0]] for c in chunks] == [epochs * k for k in range(len(chunks))]
    assert len(updates) == epochs * (len(chunks) - 1)
    if chunk_tokens >= n:
        assert len(chunks) == 1 and updates == []
    for u, update in enumerate(updates):
        chunk = chunks[u // epochs]
        # Only targets scored before this update, by a model that had not seen them: both the
        # targets that carried the gradient and every token the update's windows held (token j is
        # target j - 1).
        assert all(scored_at[t] <= u for t in update["held"]), u
        assert all(scored_at[t] <= u for t in update["trained"]), u
        # The gradient: the targets the chunk just scored, each once (a masked position is inert).
        assert sorted(update["trained"]) == chunk, u
    # The last chunk is never trained on.
    assert not set(chunks[-1]) & {t for update in updates for t in update["trained"]}
    # The records have teeth: a pass that trained on a target before scoring it would be seen.
    if updates:
        assert max(scored_at) > 0 and max(scored_at[t] for t in chunks[-1]) == len(updates)


# -----------------------------------------------------------------------------
# The arithmetic: against a slow per-target reference and against the plain sliding score
# -----------------------------------------------------------------------------


def reference_ttt(
    model,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    stride: int,
    chunk_tokens: int,
    lr: float,
    epochs: int,
    momentum: float,
    clip: float,
) -> torch.Tensor:
    """Per-target losses of score-first TTT, one target at a time, from the definitions:

    target t is scored by the window that ends soonest after it (windows end at w, w+s, ..., and at
    the end of the split); a chunk is the targets whose scoring window ends in [k*C, (k+1)*C); the
    chunks are scored in order; after each one but the last, `epochs` SGD steps (momentum,
    global-norm clip, lr cosine-decayed from chunk 0 to the last chunk) on the mean loss of its
    targets, target t seen from the start of its training window: the chunk's targets cut into
    windows of w from its first target, the last one ending at its end.
    """
    n = tokens.numel() - 1
    w = min(seq_len, n)
    s = stride if 0 < stride < w else w
    end = [w if t < w else min(n, w + math.ceil((t + 1 - w) / s) * s) for t in range(n)]
    chunk_of = [(e - 1) // chunk_tokens for e in end]
    chunk_ids = sorted(set(chunk_of))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = torch.full((n,), float("nan"), dtype=torch.float64)

    def target_loss(t: int, start: int) -> torch.Tensor:
        return F.cross_entropy(
            model(tokens[start : t + 1][None].long())[0, -1], tokens[t + 1].long()
        )

    model.eval()
    for i, c in enumerate(chunk_ids):
        targets = [t for t in range(n) if chunk_of[t] == c]
        with torch.no_grad():
            for t in targets:
                losses[t] = target_loss(t, end[t] - w).double()
        if i == len(chunk_ids) - 1:
            break
        lo, hi = targets[0], targets[-1] + 1
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / (len(chunk_ids) - 1)))
        for _ in range(epochs):
            opt.zero_grad()
            loss = sum(
                target_loss(t, min(lo + ((t - lo) // w + 1) * w, hi) - w) for t in targets
            ) / len(targets)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return losses


@pytest.mark.parametrize(
    "seq_len,stride,chunk_tokens,clip", [(16, 4, 48, 1.0), (12, 0, 30, 0.0), (16, 5, 37, 0.05)]
)
def test_matches_a_per_target_reference(
    tiny_data, val_tokens, luts, seq_len, stride, chunk_tokens, clip
):
    tokens = val_tokens[:161]
    h = settings(
        tiny_data,
        ttt_chunk_tokens=chunk_tokens,
        ttt_lr=0.05,
        ttt_epochs=2,
        ttt_momentum=0.9,
        ttt_grad_clip=clip,
    )
    reference = reference_ttt(
        random_gpt(h),
        tokens,
        seq_len=seq_len,
        stride=stride,
        chunk_tokens=chunk_tokens,
        lr=0.05,
        epochs=2,
        momentum=0.9,
        clip=clip,
    )
    r = tg.evaluate_ttt(
        random_gpt(h), tokens, luts, h, seq_len=seq_len, stride=stride, batch_seqs=3
    )
    assert not reference.isnan().any()
    assert r.scored_tokens == tokens.numel() - 1
    # Float64 weights, fp32 losses: batched and one-at-a-time sums agree to ~1e-9 (measured: 0 to
    # 3e-9).
    assert r.val_loss * r.scored_tokens == pytest.approx(reference.sum().item(), rel=1e-7)
    # Teeth: without training the sum differs by over a thousand times that tolerance (measured:
    # 3e-4 with the tightest clip, up to 5e-2).
    plain = tg.evaluate(random_gpt(h), tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=3)
    assert abs(plain.val_loss - r.val_loss) > 1e-4 * r.val_loss


def test_lr_zero_is_the_sliding_score(tiny_data, val_tokens, luts):
    tokens = val_tokens[:1201]
    h = settings(tiny_data, ttt_chunk_tokens=100, ttt_lr=0.0, ttt_epochs=3)
    model = random_gpt(h)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = tg.evaluate(model, tokens, luts, seq_len=32, stride=8, batch_seqs=16)
    ttt = tg.evaluate_ttt(model, tokens, luts, h, seq_len=32, stride=8, batch_seqs=16)
    # trained with lr 0: unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ttt.scored_tokens == sliding.scored_tokens == tokens.numel() - 1
    assert ttt.scored_bytes == sliding.scored_bytes
    assert ttt.val_loss * ttt.scored_tokens == pytest.approx(
        sliding.val_loss * sliding.scored_tokens, rel=1e-12
    )
    assert ttt.val_bpb == pytest.approx(sliding.val_bpb, rel=1e-12)
    moved = tg.evaluate_ttt(
        random_gpt(h),
        tokens,
        luts,
        dataclasses.replace(h, ttt_lr=0.01),
        seq_len=32,
        stride=8,
        batch_seqs=16,
    )
    # lr > 0 does move the score
    assert abs(moved.val_loss - sliding.val_loss) > 1e-4 * sliding.val_loss


def test_fixed_shapes_and_no_fake_quant(tiny_data, val_tokens, luts, monkeypatch):
    """One training shape and at most two scoring shapes for the whole pass (a compiled model never
    recompiles per chunk); the artifact's weights, never fake-quantized, though QAT is on and the
    model in training mode."""
    h = settings(tiny_data, ttt_chunk_tokens=70, ttt_lr=0.01, ttt_epochs=1)
    model = tg.build_model(h, CPU)  # QAT on, training mode
    assert any(m.qat is not None for m in model.modules() if isinstance(m, tg.CastedLinear))

    def no_fake_quant(*args, **kwargs):
        raise AssertionError("fake-quant ran during test-time training")

    monkeypatch.setattr(tg, "fake_quantize", no_fake_quant)
    recorder = ShapeRecorder(model)
    r = tg.evaluate_ttt(recorder, val_tokens[:701], luts, h, seq_len=32, stride=8, batch_seqs=64)
    assert r.scored_tokens == 700
    # Batches no larger than a chunk needs: most windows, most training windows of 32 targets.
    chunks = {}
    for start, k in tg.plan_windows(700, 32, 8):
        chunks.setdefault((start + 31) // 70, []).append((start, k))
    chunks = list(chunks.values())
    most_windows = max(map(len, chunks))
    most_seqs = max(math.ceil((c[-1][0] + 32 - (c[0][0] + 32 - c[0][1])) / 32) for c in chunks[:-1])
    # the last chunk ends with the split: one more window
    assert (most_windows, most_seqs) == (10, 3)
    shapes = [(grad, x, score_last) for grad, x, _, score_last in recorder.calls]
    assert set(shapes) == {(False, (10, 32), 32), (False, (10, 32), 8), (True, (3, 32), 32)}
    assert sum(s[0] for s in shapes) == len(chunks) - 1  # one step (one micro-batch) per chunk


# -----------------------------------------------------------------------------
# Settings
# -----------------------------------------------------------------------------


def test_settings_defaults_and_validation():
    h = tg.Hyperparameters.from_env({})
    assert (
        h.ttt_enabled,
        h.ttt_chunk_tokens,
        h.ttt_lr,
        h.ttt_epochs,
        h.ttt_momentum,
        h.ttt_grad_clip,
    ) == (False, 32768, 0.005, 3, 0.9, 1.0)
    ok = tg.Hyperparameters.from_env(
        {
            "TTT_ENABLED": "1",
            "TTT_LR": "0",
            "TTT_EPOCHS": "0",
            "TTT_GRAD_CLIP": "0",
            "TTT_MOMENTUM": "0",
        }
    )
    assert ok.ttt_enabled and ok.ttt_lr == 0 and ok.ttt_epochs == 0
    for name, value in [
        ("TTT_ENABLED", "2"),
        ("TTT_ENABLED", "yes"),
        ("TTT_CHUNK_TOKENS", "0"),
        ("TTT_CHUNK_TOKENS", "1.5"),
        ("TTT_LR", "-0.001"),
        ("TTT_LR", "nan"),
        ("TTT_EPOCHS", "-1"),
        ("TTT_MOMENTUM", "1"),
        ("TTT_MOMENTUM", "-0.1"),
        ("TTT_GRAD_CLIP", "-1"),
    ]:
        with pytest.raises(ValueError, match=name):
            tg.Hyperparameters.from_env({name: value})


def test_the_projection_line_names_ttt_and_its_remedy():
    """On CUDA the TTT pass gets its own projected 8-GPU time, with the warning over the budget."""
    lines = []

    def log(msg, console=True):
        lines.append(msg)

    tg.log_eval_projection(log, tg.FINEWEB_VAL_TOKENS / 8 / 500, 1, "_ttt", "lower TTT_EPOCHS")
    tg.log_eval_projection(log, tg.FINEWEB_VAL_TOKENS / 8 / 700, 1, "_ttt", "lower TTT_EPOCHS")
    assert lines[:2] == ["projected_fineweb_8gpu_ttt:500.0s", "projected_fineweb_8gpu_ttt:700.0s"]
    assert len(lines) == 3 and lines[2].endswith(
        "over the 600s evaluation budget; lower TTT_EPOCHS"
    )


# -----------------------------------------------------------------------------
# The script
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ttt_run(tiny_data, tmp_path_factory) -> dict:
    """A whole tiny run with TTT on: trained, exported, read back, scored sliding, then with TTT."""
    root = tmp_path_factory.mktemp("ttt_run")
    env = tiny_env(tiny_data, root, RUN_ID="ttt", **RUN_SETTINGS)
    proc = run_script(env)
    return {
        "env": env,
        "root": root,
        "stdout": proc.stdout,
        "log": log_events(root / "logs" / "ttt.txt"),
        "summary": json.loads((root / "logs" / "ttt.json").read_text()),
    }


def rescore_env(run: dict, tmp_path: Path, **overrides) -> dict:
    env = dict(
        run["env"],
        LOG_DIR=str(tmp_path / "logs"),
        ARTIFACT_DIR=str(tmp_path / "artifacts"),
        ITERATIONS="0",
        INIT_CHECKPOINT=run["summary"]["raw_checkpoint_path"],
        RUN_ID="rescore",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def test_a_run_with_ttt_reports_the_ttt_score(ttt_run, tiny_data, val_tokens, luts):
    summary, log = ttt_run["summary"], ttt_run["log"]
    ((val_loss, val_bpb, scored, *_),) = [m.groups() for m in TTT_LINE.finditer(log)]
    assert int(scored) == summary["scored_tokens"] == tiny_data["val_tokens"] - 1
    assert (
        summary["val_bpb"] == summary["ttt_val_bpb"]
        and summary["val_loss"] == summary["ttt_val_loss"]
    )
    assert float(val_bpb) == pytest.approx(summary["ttt_val_bpb"], abs=1e-8)
    assert float(val_loss) == pytest.approx(summary["ttt_val_loss"], abs=1e-8)
    assert (
        f"run_complete run_id:ttt val_loss:{float(val_loss):.8f} val_bpb:{float(val_bpb):.8f}"
        in ttt_run["stdout"]
    )
    assert log.index("final_sliding_window_exact") < log.index("final_ttt_exact")
    assert "projected_fineweb" not in log  # a CPU rate says nothing about the 8-GPU budget
    # The number is the artifact's: the file read back from disk, passed through evaluate_ttt here.
    h = tg.Hyperparameters.from_env(ttt_run["env"])
    model = tg.build_model(h, CPU)
    model.load_state_dict(
        tg.dequantize_state_dict(tg.read_artifact(Path(summary["artifact_path"]))), strict=True
    )
    r = tg.evaluate_ttt(model, val_tokens, luts, h, seq_len=64, stride=16, batch_seqs=32)
    assert r.val_loss == pytest.approx(summary["ttt_val_loss"], rel=1e-9)
    assert r.val_bpb == pytest.approx(summary["ttt_val_bpb"], rel=1e-9)
    # Adapting to already-scored text of the same split helps a briefly trained model.
    assert summary["ttt_val_bpb"] < summary["sliding_val_bpb"] - 1e-3, summary


def test_two_processes_give_the_ttt_score_of_one(ttt_run, tmp_path):
    """Two ranks, and micro-batches of 5 windows instead of 32: the same scores per window and the
    same gradient up to the order of its fp32 sums (each rank's micro-batches, then the all-reduce),
    so the same weights up to rounding. Measured: 5e-10 relative on the score (bit for bit with the
    same micro-batches). The tolerance, 1e-6, is far above that rounding and far below what TTT
    moves (7e-2 here; the test above asks for over 1e-3 bpb), so a rank that trained on other
    windows, or skipped the all-reduce, fails it."""
    run_script(rescore_env(ttt_run, tmp_path, EVAL_BATCH_SEQS=5), nproc=2)
    two = json.loads((tmp_path / "logs" / "rescore.json").read_text())
    one = ttt_run["summary"]
    assert two["world_size"] == 2 and two["scored_tokens"] == one["scored_tokens"]
    # same artifact
    assert two["sliding_val_loss"] == pytest.approx(one["sliding_val_loss"], rel=1e-9)
    assert two["ttt_val_loss"] == pytest.approx(one["ttt_val_loss"], rel=1e-6)
    assert two["ttt_val_bpb"] == pytest.approx(one["ttt_val_bpb"], rel=1e-6)
    assert two["val_bpb"] == two["ttt_val_bpb"]


def test_off_means_off(ttt_run, tmp_path):
    run_script(rescore_env(ttt_run, tmp_path, TTT_ENABLED=0))
    summary = json.loads((tmp_path / "logs" / "rescore.json").read_text())
    log = log_events(tmp_path / "logs" / "rescore.txt")
    assert summary["ttt_val_bpb"] is None and summary["ttt_val_loss"] is None
    assert (
        summary["val_bpb"]
        == summary["sliding_val_bpb"]
        == pytest.approx(ttt_run["summary"]["sliding_val_bpb"], rel=1e-12)
    )
    assert "final_ttt" not in log
