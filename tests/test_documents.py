"""DOC_ATTENTION: a token attends only to its own document, checked against each document (or
piece of one) run alone through the model; and the record's variants (the gated SmearGate, the
sparse attention gate, the zero out-projection init, the lane init, the clamped warmdown), each
against a hand-written computation."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import train_gpt as tg
from conftest import randomized, small_hparams

BOS = tg.BOS_ID
EVERYTHING = dict(  # GQA (4 heads on 2), XSA, partial RoPE, loops, parallel lanes, both gates
    num_layers=6,
    xsa_last_n=3,
    rope_dims=4,
    num_loops=1,
    loop_start=1,
    loop_end=2,
    parallel_residual_start=4,
    bigram_buckets=31,
    bigram_dim=8,
    smear_gate="gated",
    attn_gate="sparse",
    doc_attention=True,
)
small_h = functools.partial(small_hparams, **EVERYTHING)


def documents_model(**overrides) -> tg.GPT:
    model = randomized(tg.GPT(small_h(**overrides)), seed=4).eval()
    model.looping = True
    return model


def row_with_documents(gen: torch.Generator, length: int, bos_at: list[int]) -> torch.Tensor:
    ids = torch.randint(2, 64, (length,), generator=gen)
    ids[bos_at] = BOS
    return ids


def pieces(stream: list[int], seq_len: int | None) -> list[tuple[int, int]]:
    """[start, end) of each document of a stream (a new one at each BOS, the first at 0), cut
    every seq_len tokens from its start when seq_len is given: written out as a loop."""
    starts = [0] + [t for t, tok in enumerate(stream) if tok == BOS and t > 0]
    out = []
    for a, b in zip(starts, starts[1:] + [len(stream)], strict=True):
        step = seq_len or (b - a)
        out += [(p, min(p + step, b)) for p in range(a, b, step)]
    return out


def test_the_mask_is_causal_and_inside_each_document():
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([row_with_documents(gen, 12, at) for at in ([0, 5], [3, 4, 11], [])])
    mask = tg.document_mask(ids, BOS, packed=False)[:, 0]
    for b in range(3):
        doc = [next(i for i, (a, e) in enumerate(pieces(ids[b].tolist(), None)) if a <= t < e)
               for t in range(12)]  # fmt: skip
        want = torch.tensor([[k <= q and doc[k] == doc[q] for k in range(12)] for q in range(12)])
        assert torch.equal(mask[b], want)
    # packed: three rows of 4 are one stream of 12; keys are the previous row's, then the row's
    flat = row_with_documents(gen, 12, [2, 3])
    mask = tg.document_mask(flat.view(3, 4), BOS, packed=True)[:, 0]
    piece = {t: i for i, (a, e) in enumerate(pieces(flat.tolist(), 4)) for t in range(a, e)}
    for b in range(3):
        for q in range(4):
            for j in range(8):
                k = 4 * (b - 1) + j  # the key's place in the stream
                want = 0 <= k <= 4 * b + q and piece[k] == piece[4 * b + q]
                assert bool(mask[b, q, j]) == want, (b, q, j)


@pytest.mark.parametrize("overrides", [{}, {"num_loops": 0}, {"parallel_residual_start": 0}])
def test_rows_of_several_documents_equal_each_document_run_alone(overrides):
    model = documents_model(**overrides)
    gen = torch.Generator().manual_seed(1)
    rows = [[0, 7, 8, 19], [5, 13], [], [1, 2, 3, 22]]
    ids = torch.stack([row_with_documents(gen, 24, at) for at in rows])
    with torch.no_grad():
        together = model(ids)
        for b in range(len(rows)):
            for a, e in pieces(ids[b].tolist(), None):
                alone = model(ids[b : b + 1, a:e])
                torch.testing.assert_close(together[b : b + 1, a:e], alone, rtol=0, atol=1e-9)
        # and it is not the cross-document model
        model.doc_attention = False
        assert (model(ids) - together).abs().amax() > 1e-3


def test_packed_training_rows_equal_each_piece_run_alone():
    """Training's rows are one stream: a document crossing a row boundary keeps its context, and a
    document longer than TRAIN_SEQ_LEN is cut every TRAIN_SEQ_LEN tokens from its start."""
    gen = torch.Generator().manual_seed(2)
    T = 8
    flat = row_with_documents(gen, 4 * T, [5, 6, 12, 31])  # 12..30: 19 tokens, cut at 20 and 28
    assert pieces(flat.tolist(), T)[3:6] == [(12, 20), (20, 28), (28, 31)]
    # SmearGate and BigramHash read the previous token inside a document even across a cut, so
    # the pieces run alone match only without them; the documents' own test has them on.
    model = documents_model(smear_gate="0", bigram_buckets=0)
    with torch.no_grad():
        together = model.hidden(flat.view(4, T), packed=True).reshape(1, 4 * T, -1)
        for a, e in pieces(flat.tolist(), T):
            alone = model.hidden(flat[None, a:e])
            torch.testing.assert_close(together[:, a:e], alone, rtol=0, atol=1e-9)
    # with SmearGate and BigramHash: documents shorter than T, each run alone
    flat = row_with_documents(gen, 4 * T, [3, 9, 10, 17, 24])
    model = documents_model()
    with torch.no_grad():
        together = model.hidden(flat.view(4, T), packed=True).reshape(1, 4 * T, -1)
        for a, e in pieces(flat.tolist(), T):
            torch.testing.assert_close(
                together[:, a:e], model.hidden(flat[None, a:e]), rtol=0, atol=1e-9
            )


@pytest.mark.parametrize("packed", [False, True])
def test_flex_attentions_block_mask_gives_the_logits_of_the_sdpa_mask(packed):
    """CUDA runs DOC_ATTENTION through flex_attention; its forward runs on the CPU too."""
    model = documents_model().float()
    gen = torch.Generator().manual_seed(9)
    x = row_with_documents(gen, 256, [0, 40, 41, 130, 200]).view(2, 128)
    with torch.no_grad():
        sdpa = model(x, packed=packed)
        model.doc_attention = "flex"
        flex = model(x, packed=packed)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-4)
    assert isinstance(tg.document_mask(x, BOS, packed, flex=True), tg.BlockMask)


def test_a_training_step_with_documents_reads_the_rows_as_one_stream():
    model = documents_model(smear_gate="0", bigram_buckets=0)
    gen = torch.Generator().manual_seed(3)
    flat = row_with_documents(gen, 33, [0, 11, 20])
    x, y = flat[:-1].view(4, 8), flat[1:].view(4, 8)
    model.train()
    loss = model(x, y, packed=True)
    with torch.no_grad():
        model.eval()
        alone = [model(x.reshape(1, -1)[:, a:e]) for a, e in pieces(x.reshape(-1).tolist(), 8)]
        logits = torch.cat(alone, dim=1).reshape(-1, 64)
        want = torch.nn.functional.cross_entropy(logits, y.reshape(-1))
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-9)


def test_compiled_with_documents_builds_one_graph_per_shape_however_documents_fall():
    torch._dynamo.reset()
    model = tg.GPT(small_hparams(num_layers=1, doc_attention=True))
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    gen = torch.Generator().manual_seed(8)
    layouts = ([0, 9], [], [3, 4, 5, 30], list(range(0, 32, 2)))
    graphs = []
    for at in layouts:  # training: packed rows, forward and backward
        x = row_with_documents(gen, 32, at).view(2, 16)
        compiled(x, x, packed=True).backward()
        graphs.append(tg.compile_stats()[0])
    model.eval()
    with torch.no_grad():
        for at in layouts:  # evaluation: rows apart
            x = row_with_documents(gen, 32, at).view(2, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
            graphs.append(tg.compile_stats()[0])
    assert graphs[1:4] == graphs[:1] * 3 and graphs[4:] == [graphs[0] + 1] * 4, graphs


# ----------------------------------------------------------------------------------------------
# The record's variants, each against a hand-written computation
# ----------------------------------------------------------------------------------------------


def test_the_gated_smear_gate_adds_lambda_sigmoid_w_x_of_the_previous_token():
    smear = tg.SmearGate(16, kind="gated").double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[1, 5, 6, 1, 7, 8], [9, 1, 10, 11, 12, 1]])
    smear.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(smear(x, ids), x)  # lambda = W = 0: the identity at init
        smear.gate.copy_(torch.randn(1, 12, generator=gen, dtype=torch.float64))
        smear.lam.fill_(0.7)
        out = smear(x, ids)
    for b in range(2):
        for t in range(6):
            want = x[b, t].clone()
            if t > 0 and ids[b, t] != 1:
                w_x = sum(float(smear.gate[0, i]) * float(x[b, t, i]) for i in range(12))
                want += 0.7 / (1 + math.exp(-w_x)) * x[b, t - 1]
            torch.testing.assert_close(out[b, t], want, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in smear.parameters()) == 13


def test_the_sparse_attention_gate_is_sigmoid_of_half_w_x_first_12_per_head():
    h = small_hparams(attn_gate="sparse")
    attn = randomized(tg.CausalSelfAttention(h, 0), seed=6).requires_grad_(False)
    assert attn.attn_gate.shape == (h.num_heads, 12)
    x = torch.randn(2, 5, h.model_dim, generator=torch.Generator().manual_seed(7)).double()
    ungated = randomized(tg.CausalSelfAttention(small_hparams(), 0), seed=6)
    ungated.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "attn_gate"})
    with torch.no_grad():
        y = attn(x)
        # the same attention without a gate, its output before the projection
        heads = {}
        ungated.proj.register_forward_pre_hook(lambda _, a: heads.setdefault("y", a[0]))
        ungated(x)
        gated = heads["y"].view(2, 5, h.num_heads, -1).clone()
        for b, t, head in torch.cartesian_prod(torch.arange(2), torch.arange(5), torch.arange(4)):
            w_x = sum(float(attn.attn_gate[head, i]) * float(x[b, t, i]) for i in range(12))
            gated[b, t, head] *= 1 / (1 + math.exp(-0.5 * w_x))
        want = attn.proj(gated.reshape(2, 5, -1))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def test_zero_out_init_is_orthogonal_inside_and_zero_on_the_residual_branches():
    model = tg.GPT(small_hparams(ortho_init="zero_out", mlp_mult=3))
    for name, p in model.blocks.named_parameters():
        if name.endswith("proj.weight"):  # attention out, MLP out
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.endswith(".weight"):  # Q, K, V, MLP in
            small, _ = sorted(p.shape)
            gram = p @ p.T if p.shape[0] == small else p.T @ p
            torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)
    scaled = tg.GPT(small_hparams(ortho_init="scaled", mlp_mult=3))
    assert scaled.blocks[0].mlp.proj.weight.abs().amax() > 0


def test_lane_init_sets_each_lanes_own_weight():
    h = small_hparams(num_layers=4, parallel_residual_start=2, lane_resid_init=1.1)
    model = tg.GPT(h)
    assert torch.equal(model.lane_resid, torch.full((2, 2), 1.1))
    assert torch.equal(model.lane_post, torch.ones(2, 2, 2))


def test_the_clamped_warmdown_is_the_records_max_of_the_line_and_the_floor():
    shape = dict(iterations=1000, warmdown_frac=0.85, min_lr=0.1, max_wallclock_seconds=0)
    clamped = small_hparams(**shape, warmdown_shape="clamped")
    linear = small_hparams(**shape)
    for step in range(0, 1001, 5):
        f = step / 1000
        want = max((1 - f) / 0.85, 0.1) if f >= 0.15 else 1.0
        assert tg.schedule(clamped, step, 0.0)[0] == pytest.approx(want, abs=1e-12), step
        want = 0.1 + 0.9 * min((1 - f) / 0.85, 1.0)
        assert tg.schedule(linear, step, 0.0)[0] == pytest.approx(want, abs=1e-12), step
    # on the floor from f = 0.915
    assert tg.schedule(clamped, 915, 0.0)[0] == pytest.approx(0.1)
    assert tg.schedule(clamped, 914, 0.0)[0] > 0.1 + 1e-4
