"""What DOC_ATTENTION costs: one compiled training micro-step (forward and backward on packed
rows) and one compiled evaluation batch (rows apart, the last EVAL_STRIDE positions scored), with
document-isolated attention off and on, at the default and the frontier model shapes.

    python bench/doc_attention.py                       # both shapes
    python bench/doc_attention.py --shapes frontier --rows 1 --reps 3
    DEVICE=cuda python bench/doc_attention.py --rows 32  # on a GPU (bf16 autocast)

The two models of a shape (off, on) have the same weights and are timed alternately on the same
batch, so the ratio holds even on a busy machine; the batch's documents are random, one BOS every
--doc-tokens tokens on average. Compilation (the first call of each) is timed apart. Prints one
table row per shape and measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

SHAPES = {
    "default": {},
    "frontier": {"PRESET": "frontier"},
    "tiny": dict(
        NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="64"
    ),
}


def batch(h: tg.Hyperparameters, rows: int, doc_tokens: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, h.vocab_size, (rows * h.train_seq_len + 1,), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 1.0 / doc_tokens] = tg.BOS_ID
    return ids.to(device)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0)


def measure(shape: str, args) -> list[str]:
    device = torch.device(os.environ.get("DEVICE", "cpu"))
    env = {**os.environ, **SHAPES[shape]}
    models, autocast = {}, contextlib.nullcontext
    if device.type == "cuda":
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    for flag in ("0", "1"):
        h = tg.Hyperparameters.from_env(env | {"DOC_ATTENTION": flag})
        torch.manual_seed(0)
        model = tg.build_model(h, device)
        model.looping = h.num_loops > 0  # as at the end of training and in the evaluations
        models[flag] = (model, torch.compile(model, dynamic=False, fullgraph=True))
    T, s = h.train_seq_len, h.final_stride
    ids = batch(h, args.rows, args.doc_tokens, device)
    x, y = ids[:-1].view(-1, T), ids[1:].view(-1, T)

    def train(flag):
        model, compiled = models[flag]
        model.train()
        with autocast():
            loss = compiled(x, y, packed=True)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def evaluate(flag):
        model, compiled = models[flag]
        model.eval()
        with torch.no_grad(), autocast():
            compiled(x, y[:, -s:], score_last=s, reduction="none")

    lines = []
    for name, fn in (("train step", train), ("eval batch", evaluate)):
        compile_ms = {flag: timed(functools.partial(fn, flag), device) for flag in models}
        ms = {flag: [] for flag in models}
        for _ in range(args.reps):
            for flag in models:
                ms[flag].append(timed(functools.partial(fn, flag), device))
        off, on = (statistics.median(ms[f]) for f in ("0", "1"))
        lines.append(
            f"| {shape} | {name} | {h.num_layers}x{h.model_dim} T={T} rows={args.rows} "
            f"| {off:.0f} | {on:.0f} | {on / off:.3f} "
            f"| {compile_ms['0'] / 1000:.0f} / {compile_ms['1'] / 1000:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="default,frontier", help="comma-separated: default,frontier")
    p.add_argument("--rows", type=int, default=2, help="rows of TRAIN_SEQ_LEN tokens per batch")
    p.add_argument("--reps", type=int, default=5, help="timed calls of each, after the first")
    p.add_argument("--doc-tokens", type=int, default=700, help="mean document length in tokens")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, reps {args.reps}")
    print("| shape | measured | model | off ms | on ms | on/off | compile s (off / on) |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        measure(shape.strip(), args)


if __name__ == "__main__":
    main()
