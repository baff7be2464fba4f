"""Sliding-window evaluation: the window plan, exactness against slow references, and real runs.

Every validation target must be scored exactly once, each with the most preceding context the
window length allows. The plan is checked against brute-force enumeration; `evaluate` against a
naive plain evaluation and against slow per-target references on a tiny random model (float64, so
batching cannot move the sums); the script against itself across process counts and settings.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import CPU, ShapeRecorder, log_events, random_gpt, run_script, small_hparams, tiny_env

TRAIN_SEQ_LEN = 128
EVAL_STRIDE = 32
TRAIN_STEPS = 300

SLIDING_LINE = re.compile(
    r"final_sliding_window_exact stride:(\d+) seq_len:(\d+) val_loss:(\S+) val_bpb:(\S+) "
    r"scored_tokens:(\d+) eval_time:(\d+)ms"
)
RATE_LINE = re.compile(r"sliding_rate scored_tok_s:(\d+) per_rank:(\d+)$", re.M)


# -----------------------------------------------------------------------------
# Independent references
# -----------------------------------------------------------------------------


def effective_stride(window: int, stride: int) -> int:
    return stride if 0 < stride < window else window


def first_principles_context(t: int, num_targets: int, seq_len: int, stride: int) -> int:
    """Preceding tokens target t sees: windows of w tokens end at w, w+s, w+2s, ... (the last at the
    end of the split) and each target is scored in the first window that holds it, i.e. the one
    ending soonest after it."""
    w = min(seq_len, num_targets)
    s = effective_stride(w, stride)
    if t < w:
        return t
    end = min(num_targets, w + math.ceil((t + 1 - w) / s) * s)
    return t - (end - w)


def piece_bytes(sp: spm.SentencePieceProcessor, prev: int, tok: int) -> int:
    """The challenge's byte rule, straight from the tokenizer: no lookup tables."""
    if sp.is_control(tok) or sp.is_unknown(tok) or sp.is_unused(tok):
        return 0
    if sp.is_byte(tok):
        return 1
    piece = sp.id_to_piece(tok)
    if not piece.startswith("▁"):
        return len(piece.encode("utf-8"))
    prev_is_boundary = sp.is_control(prev) or sp.is_unknown(prev) or sp.is_unused(prev)
    return len(piece[1:].encode("utf-8")) + (0 if prev_is_boundary else 1)


@torch.no_grad()
def naive_plain(
    model, tokens: torch.Tensor, seq_len: int, luts: tg.ByteLuts
) -> tuple[float, int, int]:
    """Non-overlapping chunks of w tokens; a tail shorter than w is scored at the end of the last
    full-length window (the plan's docstring: the last window ends at the end of the split). Returns
    (loss sum, targets, bytes)."""
    n = tokens.numel() - 1
    w = min(seq_len, n)
    full = n // w * w
    x, y = tokens[:full].view(-1, w).long(), tokens[1 : full + 1].view(-1, w).long()
    loss_sum = model(x, y, reduction="none").double().sum().item()
    byte_sum = int(luts.count(x, y).sum())
    count = y.numel()
    tail = n - full
    if tail:
        x, y = tokens[n - w : n][None].long(), tokens[n - w + 1 : n + 1][None].long()
        loss_sum += model(x, y, reduction="none")[:, -tail:].double().sum().item()
        byte_sum += int(luts.count(x[:, -tail:], y[:, -tail:]).sum())
        count += tail
    return loss_sum, count, byte_sum


@torch.no_grad()
def target_losses_by_plan(model, tokens: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """Per-target loss from full logits of the window the plan assigns to that target."""
    n = tokens.numel() - 1
    w = min(seq_len, n)
    losses = torch.full((n,), float("nan"), dtype=torch.float64)
    for start, scored in tg.plan_windows(n, seq_len, stride):
        logits = model(tokens[start : start + w][None].long())[0]  # (w, V)
        for t in range(start + w - scored, start + w):
            losses[t] = F.cross_entropy(logits[t - start], tokens[t + 1].long()).double()
    return losses


@torch.no_grad()
def target_losses_first_principles(
    model, tokens: torch.Tensor, seq_len: int, stride: int
) -> torch.Tensor:
    """Per-target loss, the model run on exactly that target's context, the last position scored."""
    n = tokens.numel() - 1
    losses = torch.empty(n, dtype=torch.float64)
    for t in range(n):
        ctx = first_principles_context(t, n, seq_len, stride)
        logits = model(tokens[t - ctx : t + 1][None].long())[0, -1]  # (V,)
        losses[t] = F.cross_entropy(logits, tokens[t + 1].long()).double()
    return losses


# -----------------------------------------------------------------------------
# Fixtures
# -----------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is much faster here


@pytest.fixture(scope="module")
def snippet(val_tokens) -> torch.Tensor:
    """301 real validation tokens with a document boundary (BOS) inside, not at the start."""
    bos = (val_tokens == tg.BOS_ID).nonzero().flatten()
    start = int(bos[bos > 120][0]) - 120
    return val_tokens[start : start + 301]


@pytest.fixture(scope="module")
def random_model(tiny_data) -> tg.GPT:
    """A tiny GPT in float64 with every parameter perturbed, so each position depends on its whole
    context (at init the zero-initialized projections would make the output depend on the current
    token only)."""
    return random_gpt(small_hparams(num_layers=3, vocab_size=tiny_data["vocab_size"])).eval()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    """One real run: a tiny model trained a few hundred CPU steps, scored at stride EVAL_STRIDE."""
    root = tmp_path_factory.mktemp("sliding_trained")
    env = tiny_env(
        tiny_data,
        root,
        ITERATIONS=TRAIN_STEPS,
        TRAIN_SEQ_LEN=TRAIN_SEQ_LEN,
        EVAL_STRIDE=EVAL_STRIDE,
        TRAIN_BATCH_TOKENS=512,
        GRAD_ACCUM_STEPS=1,
        TRAIN_LOG_EVERY=100,
        RUN_ID="trained",
    )
    run_script(env)
    log = log_events(root / "logs" / "trained.txt")
    summary = json.loads((root / "logs" / "trained.json").read_text())
    return {"env": env, "root": root, "log": log, "summary": summary}


def check_rate_line(log: str, world_size: int) -> None:
    """The rate line; on a CPU no projected 8-GPU FineWeb evaluation time (meaningless there)."""
    ((_, _, _, _, scored, eval_ms),) = [m.groups() for m in SLIDING_LINE.finditer(log)]
    ((rate, per_rank),) = [m.groups() for m in RATE_LINE.finditer(log)]
    assert float(rate) == pytest.approx(int(scored) / (int(eval_ms) / 1000.0), rel=0.02)
    assert float(per_rank) == pytest.approx(float(rate) / world_size, abs=1)
    assert "projected_fineweb" not in log and "evaluation budget" not in log


def test_the_fineweb_projection_and_its_warning(capsys):
    assert tg.projected_fineweb_eval_seconds(tg.FINEWEB_VAL_TOKENS / 8, 1) == pytest.approx(1.0)
    assert tg.projected_fineweb_eval_seconds(1000.0, 4) == pytest.approx(
        tg.FINEWEB_VAL_TOKENS / 2000.0
    )
    lines = []

    def log(msg, console=True):
        lines.append(msg)

    tg.log_eval_projection(log, 2 * tg.FINEWEB_VAL_TOKENS / 8 / 500, 2)  # 500 s: inside the budget
    assert lines == ["projected_fineweb_8gpu:500.0s"]
    tg.log_eval_projection(log, tg.FINEWEB_VAL_TOKENS / 8 / 700, 1)
    assert (
        lines[1] == "projected_fineweb_8gpu:700.0s"
        and "over the 600s evaluation budget" in lines[2]
    )


def rescore_env(trained: dict, tmp_path: Path, **overrides) -> dict:
    """Settings that re-export and re-score the trained weights without training (ITERATIONS=0)."""
    env = dict(
        trained["env"],
        LOG_DIR=str(tmp_path / "logs"),
        ARTIFACT_DIR=str(tmp_path / "artifacts"),
        ITERATIONS="0",
        INIT_CHECKPOINT=trained["summary"]["raw_checkpoint_path"],
        RUN_ID="rescore",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def shipped_model(trained: dict) -> tuple[tg.Hyperparameters, tg.GPT]:
    """The artifact the trained run wrote, read back from disk as the script does."""
    h = tg.Hyperparameters.from_env(trained["env"])
    model = tg.build_model(h, torch.device("cpu"))
    payload = tg.read_artifact(Path(trained["summary"]["artifact_path"]))
    model.load_state_dict(tg.dequantize_state_dict(payload), strict=True)
    return h, model.eval()


# -----------------------------------------------------------------------------
# The window plan
# -----------------------------------------------------------------------------


def check_plan(num_targets: int, seq_len: int, stride: int) -> None:
    windows = tg.plan_windows(num_targets, seq_len, stride)
    w = min(seq_len, num_targets)
    s = effective_stride(w, stride)
    where = f"plan_windows({num_targets}, {seq_len}, {stride}) = {windows}"
    scored_in = [[] for _ in range(num_targets)]  # window indices scoring each target
    holding = [[] for _ in range(num_targets)]  # window indices whose inputs hold each target
    for k, (start, scored) in enumerate(windows):
        assert 0 <= start and start + w <= num_targets, where  # length w, inside the split
        assert 1 <= scored <= w, where
        if k > 0:
            assert scored <= s, where  # a later window scores at most its last `stride` positions
        for t in range(start, start + w):
            holding[t].append(k)
        for t in range(start + w - scored, start + w):
            scored_in[t].append(k)
    assert windows[0] == (0, w), where  # the first window scores all its positions
    for t in range(num_targets):
        assert len(scored_in[t]) == 1, f"target {t} scored {len(scored_in[t])} times: {where}"
        start = windows[scored_in[t][0]][0]
        context = t - start
        # Most context: the earliest window holding t scores it; no other planned window has more.
        assert context == max(t - windows[k][0] for k in holding[t]), where
        assert context == first_principles_context(t, num_targets, seq_len, stride), where
        assert min(t, w - s) <= context <= min(t, w - 1), where
        if t < w:
            assert context == t, where  # the first window's targets see everything before them
    # The fewest windows of length w whose ends are at most `stride` apart.
    assert len(windows) == 1 + math.ceil((num_targets - w) / s), where


def test_plan_matches_brute_force_enumeration():
    triples = [
        (n, seq_len, stride)
        for n in range(1, 50)
        for seq_len in (1, 2, 3, 5, 8, 13, 16)
        for stride in range(0, 19)
    ]
    triples += [
        (1000, 64, 7),
        (1000, 64, 64),
        (999, 128, 32),
        (1025, 1024, 64),
        (63, 64, 16),
        (64, 64, 16),
        (65, 64, 16),
        (100, 1024, 64),
    ]
    for n, seq_len, stride in triples:
        check_plan(n, seq_len, stride)


def test_plan_stride_off_is_non_overlapping():
    for n, seq_len in [(1, 4), (7, 4), (8, 4), (9, 4), (100, 16), (3, 16)]:
        w = min(seq_len, n)
        plain = tg.plan_windows(n, seq_len, 0)
        assert tg.plan_windows(n, seq_len, seq_len) == plain
        assert tg.plan_windows(n, seq_len, seq_len + 5) == plain
        full = n // w
        # disjoint chunks, each scored whole
        assert plain[:full] == [(k * w, w) for k in range(full)]
        tail = n - full * w
        # the tail once, from the last full window
        assert plain[full:] == ([(n - w, tail)] if tail else [])
    assert tg.plan_windows(0, 16, 4) == []


# -----------------------------------------------------------------------------
# evaluate() against independent computations
# -----------------------------------------------------------------------------


def test_stride_equal_to_seq_len_is_the_plain_evaluation(random_model, snippet, luts, tiny_sp):
    split_bytes = sum(
        piece_bytes(tiny_sp, int(p), int(t)) for p, t in zip(snippet[:-1], snippet[1:], strict=True)
    )
    for tokens, seq_len in [(snippet, 32), (snippet, 7), (snippet[:20], 32), (snippet[:33], 32)]:
        loss_sum, count, byte_sum = naive_plain(random_model, tokens, seq_len, luts)
        assert count == tokens.numel() - 1
        for stride in (seq_len, 0, seq_len + 3):
            r = tg.evaluate(
                random_model, tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=4
            )
            assert r.scored_tokens == count
            assert r.scored_bytes == byte_sum
            assert r.val_loss * r.scored_tokens == pytest.approx(loss_sum, rel=1e-12)
            assert r.val_bpb == pytest.approx(loss_sum / math.log(2) / byte_sum, rel=1e-12)
    r = tg.evaluate(random_model, snippet, luts, seq_len=32, stride=0, batch_seqs=4)
    assert r.scored_bytes == split_bytes  # every target's bytes, counted once


@pytest.mark.parametrize("seq_len,stride", [(32, 5), (32, 8), (16, 1)])
def test_sliding_matches_per_target_references(
    random_model, snippet, luts, tiny_sp, seq_len, stride
):
    tokens = snippet[:201]
    n = tokens.numel() - 1
    by_plan = target_losses_by_plan(random_model, tokens, seq_len, stride)
    by_context = target_losses_first_principles(random_model, tokens, seq_len, stride)
    assert not by_plan.isnan().any()  # every target scored
    torch.testing.assert_close(by_context, by_plan, rtol=0, atol=1e-5)
    r = tg.evaluate(random_model, tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=3)
    assert r.scored_tokens == n
    assert r.scored_bytes == sum(
        piece_bytes(tiny_sp, int(p), int(t)) for p, t in zip(tokens[:-1], tokens[1:], strict=True)
    )
    loss_sum = r.val_loss * r.scored_tokens
    assert loss_sum == pytest.approx(by_plan.sum().item(), rel=1e-12)
    assert loss_sum == pytest.approx(by_context.sum().item(), rel=1e-7)
    # The check has teeth: with less context (plain windows) the per-target losses and sum move.
    plain = target_losses_by_plan(random_model, tokens, seq_len, 0)
    assert (plain - by_plan).abs().max() > 1e-2
    assert abs(plain.sum().item() - loss_sum) > 1e-3 * loss_sum


@pytest.mark.parametrize("seq_len,stride", [(32, 5), (32, 32)])
def test_with_documents_each_target_sees_only_its_own_document(
    tiny_data, snippet, luts, seq_len, stride
):
    """DOC_ATTENTION=1: every target scored once, its bytes counted once, each by the model run
    on the part of its sliding context that lies in its own document."""
    h = small_hparams(num_layers=3, vocab_size=tiny_data["vocab_size"], doc_attention=True)
    model = random_gpt(h).eval()
    tokens = snippet[:201]
    n = tokens.numel() - 1
    bos = [t for t in range(n) if tokens[t] == tg.BOS_ID]
    assert bos and bos[0] > seq_len  # a document starts inside the scored span
    want = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for t in range(n):
            own = t - max([b for b in bos if b <= t], default=0)  # tokens of its document before it
            ctx = min(first_principles_context(t, n, seq_len, stride), own)
            logits = model(tokens[t - ctx : t + 1][None].long())[0, -1]
            want[t] = F.cross_entropy(logits, tokens[t + 1].long()).double()
    torch.testing.assert_close(target_losses_by_plan(model, tokens, seq_len, stride), want)
    r = tg.evaluate(model, tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=3)
    assert r.scored_tokens == n
    assert r.scored_bytes == int(
        luts.count(tokens[:-1][None].long(), tokens[1:][None].long()).sum()
    )
    assert r.val_loss * n == pytest.approx(want.sum().item(), rel=1e-9)
    model.doc_attention = False  # the check has teeth: across documents the losses differ
    across = tg.evaluate(model, tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=3)
    assert abs(across.val_loss - r.val_loss) > 1e-4


def test_batching_does_not_change_the_sums(random_model, snippet, luts):
    results = [
        tg.evaluate(random_model, snippet, luts, seq_len=24, stride=stride, batch_seqs=batch)
        for stride in (5, 24)
        for batch in (0, 1, 2, 7, 1000)
    ]
    for stride_results in (results[:5], results[5:]):
        for r in stride_results[1:]:
            assert (r.val_loss, r.scored_tokens, r.scored_bytes) == (
                stride_results[0].val_loss,
                stride_results[0].scored_tokens,
                stride_results[0].scored_bytes,
            )


@pytest.mark.parametrize("stride, shapes", [(5, 2), (24, 1), (0, 1)])
def test_padded_batches_call_the_model_with_at_most_two_shapes(
    random_model, snippet, luts, stride, shapes
):
    unpadded = tg.evaluate(random_model, snippet, luts, seq_len=24, stride=stride, batch_seqs=1)
    recorder = ShapeRecorder(random_model)
    padded = tg.evaluate(recorder, snippet, luts, seq_len=24, stride=stride, batch_seqs=7)
    windows = tg.plan_windows(snippet.numel() - 1, 24, stride)
    calls = [(x, y, score_last) for _, x, y, score_last in recorder.calls]
    assert len(windows) % 7 and len(set(calls)) == shapes  # a short last batch was padded
    assert all(x[0] == 7 for x, _, _ in calls)
    assert (padded.val_loss, padded.scored_tokens, padded.scored_bytes) == (
        unpadded.val_loss,
        unpadded.scored_tokens,
        unpadded.scored_bytes,
    )


def test_evaluation_scores_in_eval_mode_and_restores_the_mode(tiny_data, snippet, luts):
    h = small_hparams(num_layers=2, vocab_size=tiny_data["vocab_size"])
    model = tg.build_model(h, CPU)  # QAT on: in training mode the forward is fake-quantized
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    model.eval()
    in_eval = tg.evaluate(model, snippet, luts, seq_len=24, stride=5, batch_seqs=4)
    model.train()
    in_train = tg.evaluate(model, snippet, luts, seq_len=24, stride=5, batch_seqs=4)
    assert model.training and in_train.val_loss == in_eval.val_loss
    x = snippet[:24][None].long()
    assert not torch.equal(model(x), model.eval()(x))  # the modes do differ: fake-quant in training


def test_ranks_split_the_windows(random_model, snippet, luts, monkeypatch):
    """Each rank scores a disjoint share; together exactly the single-process sums."""
    single = tg.evaluate(random_model, snippet, luts, seq_len=24, stride=5, batch_seqs=4)
    total = torch.tensor(
        [single.val_loss * single.scored_tokens, single.scored_tokens, single.scored_bytes],
        dtype=torch.float64,
    )

    # keep this rank's share, hand back the total as a real all_reduce would
    def all_reduce(t, op=None):
        shares.append(t.clone())
        t.copy_(total)

    monkeypatch.setattr(tg.dist, "all_reduce", all_reduce)
    for world_size in (2, 3, 100):  # more ranks than windows: some ranks score nothing
        shares = []
        for rank in range(world_size):
            tg.evaluate(
                random_model,
                snippet,
                luts,
                seq_len=24,
                stride=5,
                batch_seqs=4,
                rank=rank,
                world_size=world_size,
            )
        loss_sum, count, byte_sum = torch.stack(shares).sum(0).tolist()
        assert count == single.scored_tokens and byte_sum == single.scored_bytes
        assert loss_sum == pytest.approx(single.val_loss * single.scored_tokens, rel=1e-12)


# -----------------------------------------------------------------------------
# The script: settings, log lines, summary, processes
# -----------------------------------------------------------------------------


def test_settings_defaults():
    h = tg.Hyperparameters.from_env({"TRAIN_SEQ_LEN": "256"})
    assert h.eval_stride == 64
    assert h.effective_eval_seq_len == 256
    assert (
        tg.Hyperparameters.from_env(
            {"TRAIN_SEQ_LEN": "256", "EVAL_SEQ_LEN": "512"}
        ).effective_eval_seq_len
        == 512
    )
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        tg.Hyperparameters.from_env({"EVAL_STRIDE": "-1"})


def test_trained_run_reports_the_sliding_score(trained, tiny_data, luts, val_tokens):
    summary, log = trained["summary"], trained["log"]
    ((stride, seq_len, val_loss, val_bpb, scored, _),) = [
        m.groups() for m in SLIDING_LINE.finditer(log)
    ]
    # EVAL_SEQ_LEN defaults to TRAIN_SEQ_LEN
    assert (int(stride), int(seq_len)) == (EVAL_STRIDE, TRAIN_SEQ_LEN)
    # every target once
    assert int(scored) == summary["scored_tokens"] == tiny_data["val_tokens"] - 1
    assert summary["val_tokens"] == tiny_data["val_tokens"]
    assert (
        summary["val_bpb"] == summary["sliding_val_bpb"]
        and summary["val_loss"] == summary["sliding_val_loss"]
    )
    assert float(val_bpb) == pytest.approx(summary["sliding_val_bpb"], abs=1e-8)
    assert float(val_loss) == pytest.approx(summary["sliding_val_loss"], abs=1e-8)
    check_rate_line(log, world_size=1)
    # The reported score is the shipped artifact's: re-read from disk, re-scored in one process.
    _, model = shipped_model(trained)
    r = tg.evaluate(
        model, val_tokens, luts, seq_len=TRAIN_SEQ_LEN, stride=EVAL_STRIDE, batch_seqs=64
    )
    assert r.scored_tokens == summary["scored_tokens"]
    assert r.val_loss == pytest.approx(summary["sliding_val_loss"], rel=1e-9)
    assert r.val_bpb == pytest.approx(summary["sliding_val_bpb"], rel=1e-9)


def test_sliding_beats_plain_on_a_trained_model(trained):
    summary = trained["summary"]
    assert summary["steps"] == TRAIN_STEPS
    # Same artifact and targets; only the context differs. Float noise ~1e-7: a 1e-3 gain is real.
    assert summary["sliding_val_bpb"] < summary["roundtrip_val_bpb"] - 1e-3, summary


def test_two_processes_score_like_one(trained, tmp_path):
    env = rescore_env(trained, tmp_path, EVAL_BATCH_SEQS=5)
    run_script(env, nproc=2)
    two = json.loads((tmp_path / "logs" / "rescore.json").read_text())
    one = trained["summary"]
    assert two["world_size"] == 2
    assert two["scored_tokens"] == one["scored_tokens"]
    for key in ("sliding_val_loss", "sliding_val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=0), key
    log = log_events(tmp_path / "logs" / "rescore.txt")
    ((stride, seq_len, _, _, scored, _),) = [m.groups() for m in SLIDING_LINE.finditer(log)]
    assert (int(stride), int(seq_len), int(scored)) == (
        EVAL_STRIDE,
        TRAIN_SEQ_LEN,
        one["scored_tokens"],
    )
    check_rate_line(log, world_size=2)


def test_with_documents_two_processes_score_like_one(trained, tmp_path):
    scores = {}
    for nproc in (1, 2):
        env = rescore_env(trained, tmp_path / str(nproc), DOC_ATTENTION=1, EVAL_BATCH_SEQS=5)
        run_script(env, nproc=nproc)
        scores[nproc] = json.loads((tmp_path / str(nproc) / "logs" / "rescore.json").read_text())
    one, two = scores[1], scores[2]
    assert one["scored_tokens"] == two["scored_tokens"] == one["val_tokens"] - 1
    assert one["sliding_val_bpb"] != trained["summary"]["sliding_val_bpb"]  # documents apart
    for key in ("sliding_val_loss", "sliding_val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=0), key


@pytest.mark.parametrize(
    "overrides,sliding",
    [
        ({"EVAL_STRIDE": 0}, None),
        ({"EVAL_STRIDE": TRAIN_SEQ_LEN}, None),
        ({"EVAL_SEQ_LEN": 64, "EVAL_STRIDE": 16}, (64, 16)),
    ],
)
def test_eval_settings_reach_the_script(trained, tmp_path, luts, val_tokens, overrides, sliding):
    run_script(rescore_env(trained, tmp_path, **overrides))
    summary = json.loads((tmp_path / "logs" / "rescore.json").read_text())
    log = log_events(tmp_path / "logs" / "rescore.txt")
    assert summary["scored_tokens"] == summary["val_tokens"] - 1
    assert summary["roundtrip_val_bpb"] == pytest.approx(
        trained["summary"]["roundtrip_val_bpb"], rel=1e-12
    )
    if sliding is None:  # plain evaluation: no sliding line, the round-trip score is the score
        assert not SLIDING_LINE.search(log) and "sliding_rate" not in log
        assert summary["sliding_val_bpb"] is None
        assert summary["val_bpb"] == summary["roundtrip_val_bpb"]
        return
    seq_len, stride = sliding
    ((line_stride, line_seq_len, *_),) = [m.groups() for m in SLIDING_LINE.finditer(log)]
    assert (int(line_seq_len), int(line_stride)) == (seq_len, stride)
    _, model = shipped_model(trained)
    r = tg.evaluate(model, val_tokens, luts, seq_len=seq_len, stride=stride, batch_seqs=64)
    assert summary["val_bpb"] == summary["sliding_val_bpb"] == pytest.approx(r.val_bpb, rel=1e-9)
