"""Parameter-golf trainer: a small GPT trained under a wall-clock cap, shipped as a quantized,
compressed artifact that is read back from disk and scored in bits per byte.

Run on 8 GPUs:  torchrun --standalone --nproc_per_node=8 train_gpt.py
Run on CPU:     DEVICE=cpu python3 train_gpt.py   (small settings, see README.md)

Every setting is an environment variable (a `Hyperparameters` field, upper-cased), declared with
its default, its rule and one line of meaning. The file reads top to bottom: configuration, data,
byte counting, model (and `tensor_role`, which says how each tensor is treated), optimizers and
schedules, quantization and the artifact, evaluation, training, run management (processes,
logging, signals, files, checkpoints, preflight), and `main`. Importing it does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import datetime
import difflib
import fnmatch
import functools
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

# ===== Configuration ==============================================================================

SIZE_LIMIT_BYTES = 16_000_000  # the challenge's artifact cap: code bytes + model bytes (decimal)
FINEWEB_VAL_TOKENS = 63_779_840  # the published validation split, for eval-time projections
EVAL_BUDGET_SECONDS = 600.0  # evaluation has its own 10-minute budget on 8xH100
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")  # SDPA_BACKEND=auto tries them in order

# Each seed run's published configuration, and the best stack this script supports (README).
_SEED_RUN = dict(
    MLP_MULT="3", MATRIX_LR="0.02", SCALAR_LR="0.02", TIED_EMBED_LR="0.03", MUON_MOMENTUM="0.99",
    MUON_MOMENTUM_WARMUP_START="0.92", MUON_MOMENTUM_WARMUP_STEPS="1500", WARMDOWN_ITERS="3000",
    TRAIN_SEQ_LEN="1024", TRAIN_BATCH_TOKENS="524288", EVAL_STRIDE="64",
)  # fmt: skip
PRESETS = {
    "": {},
    "pr65": {**_SEED_RUN, "QAT": "1", "EMBED_QUANT": "int8", "SMEAR_GATE": "0",
             "GRAD_CLIP_NORM": "0.0"},
    "pr102": {**_SEED_RUN, "QAT": "0", "EMBED_QUANT": "fp16", "SMEAR_GATE": "blend",
              "GRAD_CLIP_NORM": "1.0"},
    "pr114": {**_SEED_RUN, "QAT": "0", "EMBED_QUANT": "fp16", "SMEAR_GATE": "0",
              "GRAD_CLIP_NORM": "0.3", "TRAIN_SEQ_LEN": "2048", "TRAIN_BATCH_TOKENS": "786432",
              "EVAL_STRIDE": "256",
              "FP16_KEEP": "blocks.7.attn.c_k.weight,blocks.8.attn.c_k.weight"},
    "frontier": dict(  # the 1.0611 record's values, for every technique that exists here
        NUM_LAYERS="11", XSA_LAST_N="11", ROPE_DIMS="16", LN_SCALE="1", MLP_ACT="leaky_relu2",
        QK_GAIN_INIT="5.0", SKIP_GATES="1", ATTN_GATE="sparse", SMEAR_GATE="gated",
        TRAIN_SEQ_LEN="2048", TRAIN_BATCH_TOKENS="786432", MATRIX_LR="0.026", EVAL_STRIDE="64",
        MUON_MOMENTUM="0.97",
        BETA2="0.99", GRAD_CLIP_NORM="0.3", MUON_WD="0.095", EMBED_WD="0.085", ADAM_WD="0.02",
        EMA_DECAY="0.9965", WARMDOWN_FRAC="0.85", MIN_LR="0.1", MUON_ROW_NORM="1",
        MUON_NS="polar", NUM_LOOPS="2", LOOP_START="3", LOOP_END="5", ENABLE_LOOPING_AT="0.35",
        PARALLEL_RESIDUAL_START="8", LANE_RESID_INIT="1.1", ORTHO_INIT="zero_out",
        WARMDOWN_SHAPE="clamped", DOC_ATTENTION="1", VOCAB_SIZE="8192",
        DATA_PATH="./data/datasets/fineweb10B_sp8192",
        TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model", MLP_MULT="4", QAT="0",
        QUANT_METHOD="gptq", CLIP="sdclip", EMBED_QUANT="int7", SDCLIP_K_EMBED="14",
        LQER_RANK="4", LQER_TOP_K="3", COMPRESSOR="auto", BITS="auto", TTT_ENABLED="1",
    ),
}  # fmt: skip


def _knob(default, rule: str, doc: str):
    """A setting: its default, its rule (checked by `rule_error`) and one line for README/--help."""
    return field(default=default, metadata={"rule": rule, "doc": doc})


# A rule: "" (any value), ">0", ">=0", an interval "[0, 1)" / "(0, 100]", an integer range "5..8",
# alternatives "0 or >=2", choices "a|b|c", or "name" (a plain file name).
_RULE_WORDS = {">0": "must be positive", ">=0": "must not be negative"}


def _holds(value, atom: str) -> bool:
    if ".." in atom:
        lo, hi = atom.split("..")
        return int(lo) <= value <= int(hi)
    if atom[0] in "[(":
        lo, hi = (float(x) for x in atom[1:-1].split(","))
        above = lo <= value if atom[0] == "[" else lo < value
        return above and (value < hi if atom[-1] == ")" else value <= hi)
    if atom.startswith(">="):
        return value >= float(atom[2:])
    if atom.startswith(">"):
        return value > float(atom[1:])
    return value == float(atom)


def rule_error(name: str, value, rule: str) -> str | None:
    """The error naming the variable when a value breaks its setting's rule; None if it holds."""
    if rule == "name":  # a file name, with room for the longest suffix a run adds
        if value not in (".", "..") and not {"/", "\\"} & set(value) and len(value) <= 200:
            return None
        shown = value if len(value) <= 40 else value[:40] + "..."
        why = "it names files in LOG_DIR and ARTIFACT_DIR"
        return f"{name}={shown!r} must be a plain name of at most 200 characters: {why}"
    if "|" in rule:
        choices = rule.split("|")
        return None if value in choices else f"{name}={value!r} must be one of {', '.join(choices)}"
    if not rule or any(_holds(value, atom) for atom in rule.split(" or ")):
        return None
    if rule in _RULE_WORDS:
        return f"{name}={value} {_RULE_WORDS[rule]}"
    return f"{name}={value} must be {'' if ' or ' in rule else 'in '}{rule}"


@dataclass(frozen=True)
class Hyperparameters:
    """Every setting; the environment variable is the field name upper-cased."""

    preset: str = _knob("", "|".join(PRESETS), "a seed run's or the best stack's defaults")
    # Data and bookkeeping
    data_path: str = _knob("./data/datasets/fineweb10B_sp1024", "", "folder of the shards")
    tokenizer_path: str = _knob("./data/tokenizers/fineweb_1024_bpe.model", "", "its tokenizer")
    run_id: str = _knob("", "name", "name of logs/artifacts; empty = a fresh random id")
    seed: int = _knob(1337, "", "seed for initialization")
    log_dir: str = _knob("logs", "", "folder for {RUN_ID}.txt and {RUN_ID}.json")
    artifact_dir: str = _knob("artifacts", "", "folder for the raw checkpoint and the artifact")
    init_checkpoint: str = _knob("", "", "start from these weights (raw, resume or artifact)")
    resume_from: str = _knob("", "", "resume checkpoint (*_ckpt.pt) of a stopped run to continue")
    checkpoint_every_seconds: float = _knob(0.0, ">=0", "resume checkpoint every N s (0 = off)")
    check_tokenizer: bool = _knob(True, "", "refuse a tokenizer the data's manifest does not name")
    # Validation
    val_batch_size: int = _knob(524_288, ">0", "validation tokens per batch across all ranks")
    val_loss_every: int = _knob(1000, ">=0", "validate every N steps (0 = only at the end)")
    train_log_every: int = _knob(200, ">=0", "log the training loss every N steps")
    eval_seq_len: int = _knob(0, ">=0", "window of the final evaluation (0 = TRAIN_SEQ_LEN)")
    eval_stride: int = _knob(64, ">=0", "sliding stride (0 or >= EVAL_SEQ_LEN: plain windows)")
    eval_batch_seqs: int = _knob(0, ">=0", "windows per batch and rank (0 = from VAL_BATCH_SIZE)")
    final_eval: bool = _knob(True, "", "evaluate and export at the end (0 = train only)")
    # Evaluation-time training: each chunk of the final evaluation is scored, then trained on
    ttt_enabled: bool = _knob(False, "", "score-first test-time training (the run's score)")
    ttt_chunk_tokens: int = _knob(32768, ">0", "validation targets per TTT chunk")
    ttt_lr: float = _knob(0.005, ">=0", "TTT SGD learning rate, cosine-decayed over the chunks")
    ttt_epochs: int = _knob(3, ">=0", "TTT SGD steps per chunk, each on all its targets")
    ttt_momentum: float = _knob(0.9, "[0, 1)", "TTT SGD momentum")
    ttt_grad_clip: float = _knob(1.0, ">=0", "clip the TTT gradient norm (0 = off)")
    # Training length
    iterations: int = _knob(20_000, ">=0", "maximum number of optimizer steps")
    warmdown_iters: int = _knob(3000, ">=0", "LR decays to MIN_LR over the last N steps")
    warmup_steps: int = _knob(20, ">=0", "compile-priming steps, undone before training")
    train_batch_tokens: int = _knob(524_288, ">0", "tokens per optimizer step, all ranks")
    train_seq_len: int = _knob(1024, ">0", "training sequence length")
    max_wallclock_seconds: float = _knob(600.0, ">=0", "training-time cap (0 = no cap)")
    grad_accum_steps: int = _knob(0, ">=0", "micro-steps per optimizer step (0 = 8 / WORLD_SIZE)")
    # Model
    vocab_size: int = _knob(1024, "1..65536", "the tokenizer's size (uint16 shards)")
    num_layers: int = _knob(9, ">0", "transformer blocks")
    num_kv_heads: int = _knob(4, ">0", "key/value heads (GQA)")
    model_dim: int = _knob(512, ">0", "width of the residual stream")
    num_heads: int = _knob(8, ">0", "query heads")
    mlp_mult: int = _knob(3, ">0", "MLP hidden width = MLP_MULT * MODEL_DIM")
    tie_embeddings: bool = _knob(True, "", "output head shares the token embedding")
    rope_base: float = _knob(10000.0, ">0", "RoPE base frequency")
    logit_softcap: float = _knob(30.0, ">0", "logits = c * tanh(logits / c)")
    qk_gain_init: float = _knob(1.5, "", "initial per-head gain on normalized queries")
    tied_embed_init_std: float = _knob(0.005, ">=0", "init std of the tied embedding")
    smear_gate: str = _knob("blend", "0|blend|gated", "mix each token's embedding with the last's")
    xsa_last_n: int = _knob(0, ">=0", "exclusive self-attention on the last N layers")
    rope_dims: int = _knob(0, ">=0", "rotate the first N dims of each head (0 = all)")
    ln_scale: bool = _knob(False, "", "scale the norm outputs of layer i by 1/sqrt(i+1)")
    mlp_act: str = _knob("relu2", "relu2|leaky_relu2", "MLP activation")
    leaky_slope: float = _knob(0.5, "", "negative slope of leaky_relu2")
    skip_gates: bool = _knob(False, "", "sigmoid gates on the U-Net skips")
    attn_gate: str = _knob("0", "0|dense|sparse", "per-head sigmoid gate on the attention output")
    doc_attention: bool = _knob(False, "", "attention stays inside each document (BOS to BOS)")
    bigram_buckets: int = _knob(0, "0 or >=2", "BigramHash: buckets of token pairs (0 = off)")
    bigram_dim: int = _knob(128, ">0", "BigramHash: width of its table")
    ortho_init: str = _knob("0", "0|scaled|zero_out", "orthogonal block matrices; see README")
    num_loops: int = _knob(0, ">=0", "extra runs of layers LOOP_START..LOOP_END (0 = off)")
    loop_start: int = _knob(0, ">=0", "first layer of the repeated range")
    loop_end: int = _knob(0, ">=0", "last layer of the repeated range (inclusive)")
    enable_looping_at: float = _knob(0.0, "[0, 1]", "loops start at this fraction of the run")
    parallel_residual_start: int = _knob(0, ">=0", "attention and MLP on two lanes from here")
    lane_resid_init: float = _knob(1.0, "", "initial weight of each lane's own residual")
    # Optimizers
    embed_lr: float = _knob(0.6, ">=0", "Adam LR of an untied embedding")
    head_lr: float = _knob(0.008, ">=0", "Adam LR of an untied output head")
    tied_embed_lr: float = _knob(0.03, ">=0", "Adam LR of the tied embedding")
    matrix_lr: float = _knob(0.02, ">=0", "Muon LR of the block matrices")
    scalar_lr: float = _knob(0.02, ">=0", "Adam LR of vectors and scalars")
    muon_momentum: float = _knob(0.99, "[0, 1)", "Muon momentum after warm-up")
    muon_backend_steps: int = _knob(5, ">0", "Newton-Schulz iterations")
    muon_momentum_warmup_start: float = _knob(0.92, "[0, 1)", "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = _knob(1500, ">=0", "steps to reach MUON_MOMENTUM")
    beta1: float = _knob(0.9, "[0, 1)", "Adam beta1")
    beta2: float = _knob(0.95, "[0, 1)", "Adam beta2")
    adam_eps: float = _knob(1e-8, ">0", "Adam epsilon")
    grad_clip_norm: float = _knob(1.0, ">=0", "clip the global gradient norm (0 = off)")
    muon_wd: float = _knob(0.0, ">=0", "decoupled weight decay of the Muon matrices")
    embed_wd: float = _knob(0.0, ">=0", "decoupled weight decay of the embedding tables")
    adam_wd: float = _knob(0.0, ">=0", "decoupled weight decay of the other Adam parameters")
    muon_row_norm: bool = _knob(False, "", "MuonEq-R: equal row norms before Newton-Schulz")
    muon_ns: str = _knob("quintic", "quintic|polar", "Newton-Schulz coefficients (Polar Express)")
    ema_decay: float = _knob(0.0, "[0, 1)", "EMA of the weights, evaluated and exported (0 = off)")
    min_lr: float = _knob(0.0, "[0, 1]", "the warmdown ends at MIN_LR x the base LR")
    warmdown_frac: float = _knob(0.0, "[0, 1]", "warmdown over this fraction of the run (0: ITERS)")
    warmdown_shape: str = _knob("linear", "linear|clamped", "linear to MIN_LR, or to 0 floored")
    # Quantization and the artifact
    qat: bool = _knob(True, "", "fake-quantize the block matrices in training (STE)")
    late_qat_threshold: float = _knob(0.0, "[0, 1]", "QAT from when the LR scale drops below this")
    embed_quant: str = _knob("fp16", "fp16|int8|int7|int6", "token embedding in the artifact")
    mlp_bits: int = _knob(6, "5..8", "bits of the MLP matrices (QAT uses the same)")
    attn_bits: int = _knob(6, "5..8", "bits of the attention (and bigram) matrices")
    quant_method: str = _knob("rtn", "rtn|gptq", "round to nearest, or GPTQ on training data")
    gptq_calib_tokens: int = _knob(524_288, ">0", "GPTQ: training tokens for the Hessians")
    gptq_reserve_seconds: float = _knob(10.0, ">=0", "GPTQ: seconds of the cap kept for it")
    clip: str = _knob("percentile", "percentile|sdclip|search", "how each row's clip is chosen")
    sdclip_k_mlp: float = _knob(11.5, ">0", "SDClip: k standard deviations, MLP matrices")
    sdclip_k_attn: float = _knob(13.0, ">0", "SDClip: k of attention, bigram matrices and gates")
    sdclip_k_embed: float = _knob(20.0, ">0", "SDClip: k of the embedding tables and the head")
    control_quant: str = _knob("float", "float|fp16", "control tensors (scales, mixes, gains)")
    bits: str = _knob("fixed", "fixed|auto", "auto: per-group bit widths that fill the 16 MB")
    bits_budget: int = _knob(0, ">=0", "BITS=auto: total bytes to fill (0 = the 16 MB limit)")
    lqer_rank: int = _knob(0, ">=0", "LQER: rank of the quantization-error correction (0 = off)")
    lqer_top_k: int = _knob(3, ">0", "LQER: how many tensors, the largest quantization errors")
    compressor: str = _knob("zstd", "zstd|lzma|brotli|auto", "auto: the smallest codec per stream")
    fp16_keep: str = _knob("", "", "name patterns (fnmatch, comma-separated) kept in fp16")
    quant_clip_percentile: float = _knob(99.99984, "(0, 100]", "percentile clip of abs(w)")
    zstd_level: int = _knob(22, "1..22", "zstd compression level of the artifact")
    # Devices
    device: str = _knob("auto", "auto|cuda|cpu", "where to run")
    compile: str = _knob("auto", "auto|0|1", "torch.compile (auto: on CUDA)")
    sdpa_backend: str = _knob("auto", "|".join(("auto",) + SDPA_BACKENDS), "CUDA attention kernel")
    host_sync: str = _knob("auto", "auto|gloo|device", "how ranks agree each step (auto = gloo)")
    collective_timeout_seconds: float = _knob(600.0, ">0", "a peer silent this long fails the run")

    @classmethod
    def env_names(cls) -> list[str]:
        return [f.name.upper() for f in dataclasses.fields(cls)]

    @classmethod
    def from_env(cls, env) -> Hyperparameters:
        """Settings from environment variables; an explicit variable overrides PRESET's default."""
        preset = env.get("PRESET", "").strip()
        if preset not in PRESETS:
            raise ValueError(f"PRESET={preset!r} is not one of: {', '.join(filter(None, PRESETS))}")
        env = {**PRESETS[preset], **env}
        fields = [(f, f.name.upper()) for f in dataclasses.fields(cls)]
        h = cls(**{f.name: _parse_value(k, env[k], type(f.default)) for f, k in fields if k in env})
        h.validate()
        return h

    def validate(self) -> None:
        """Each setting's own rule, then the rules that relate several settings."""
        for f in dataclasses.fields(self):
            if error := rule_error(f.name.upper(), getattr(self, f.name), f.metadata["rule"]):
                raise ValueError(error)
        head_dim = self.model_dim // self.num_heads
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.model_dim % heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={heads}")
        if heads % kv_heads:
            raise ValueError(f"NUM_HEADS={heads} is not divisible by NUM_KV_HEADS={kv_heads}")
        if head_dim % 2:
            raise ValueError(f"MODEL_DIM/NUM_HEADS={head_dim} must be even (RoPE turns pairs)")
        reserve = self.gptq_reserve_seconds if self.quant_method == "gptq" else 0.0
        if 0 < self.max_wallclock_seconds <= reserve:
            raise ValueError(
                f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time under "
                f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}"
            )
        layers, rope = self.num_layers, self.rope_dims
        windowed = self.attn_gate == "sparse" or self.smear_gate == "gated"
        if windowed and self.model_dim < GATE_WINDOW:
            raise ValueError(f"ATTN_GATE=sparse/SMEAR_GATE=gated need MODEL_DIM >= {GATE_WINDOW}")
        if self.xsa_last_n > layers:
            raise ValueError(f"XSA_LAST_N={self.xsa_last_n} must be in 0..NUM_LAYERS={layers}")
        if rope % 2 or rope > head_dim:
            raise ValueError(f"ROPE_DIMS={rope} must be even and at most the head size {head_dim}")
        if self.num_loops and not self.loop_start <= self.loop_end < self.num_layers:
            raise ValueError(
                f"NUM_LOOPS={self.num_loops} needs 0 <= LOOP_START={self.loop_start} <= "
                f"LOOP_END={self.loop_end} < NUM_LAYERS={self.num_layers}"
            )
        start = self.parallel_residual_start
        after_loops = not self.num_loops or start > self.loop_end
        if start and not (self.num_layers // 2 <= start < self.num_layers and after_loops):
            raise ValueError(
                f"PARALLEL_RESIDUAL_START={start} must be a decoder layer (NUM_LAYERS//2.."
                f"NUM_LAYERS-1) after the looped ones (LOOP_END={self.loop_end})"
            )

    @property
    def effective_eval_seq_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def final_stride(self) -> int:
        """The final evaluation's stride; its window length when the windows do not overlap."""
        return window_stride(self.eval_stride, self.effective_eval_seq_len)

    @property
    def sliding(self) -> bool:
        """Whether the final evaluation differs from the plain windows of the round trip."""
        seq_len = self.effective_eval_seq_len
        return self.final_stride < seq_len or seq_len != self.train_seq_len

    def as_env(self) -> dict:
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}

    def overrides(self) -> dict:
        defaults = Hyperparameters().as_env()
        return {k: v for k, v in self.as_env().items() if defaults[k] != v}


def _parse_value(name: str, raw: str, kind: type):
    raw = raw.strip()
    if kind is bool:
        if raw not in ("0", "1"):
            raise ValueError(f"{name}={raw!r} must be 0 or 1")
        return raw == "1"
    if kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{name}={raw!r} is not {what}") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{name}={raw!r} must be finite")
        return value
    return raw


def setting_warnings(env, h: Hyperparameters) -> list[str]:
    """Warnings: look-alikes (MLP_MUL, num_layers), values replacing the preset's, parts off."""
    known, warnings = Hyperparameters.env_names(), []
    for key, value in PRESETS[h.preset].items():
        if key in env and env[key].strip() != value:
            warnings.append(f"{key}={env[key].strip()} replaces PRESET={h.preset}'s {key}={value}")
    for key in sorted(env):
        up = key.upper()
        if key in known or not (key.isupper() or key.islower()):
            continue
        if up in known:
            warnings.append(f"{key} is not read (settings are upper-case); did you mean {up}?")
        elif match := near_setting(up, known):
            warnings.append(f"{key} is not a setting of this script; did you mean {match}?")
    if h.iterations == 0 and not (h.init_checkpoint or h.resume_from):
        warnings.append("ITERATIONS=0 and no INIT_CHECKPOINT: it scores an untrained model")
    if h.eval_stride and h.final_stride == h.effective_eval_seq_len:
        warnings.append(
            f"EVAL_STRIDE={h.eval_stride} >= EVAL_SEQ_LEN={h.effective_eval_seq_len}: "
            "sliding-window evaluation is off, the final score uses non-overlapping windows"
        )
    return [f"warning: {w}" for w in warnings]


def near_setting(name: str, known: list[str]) -> str | None:
    """The setting a variable looks like a misspelling (NUM_LAYER) or a short form (VOCAB, ITERS,
    LAYERS) of: close as a whole, or one word of five letters or more that is a word of the
    setting's name or, less a plural s, its start."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
    short = len(name) >= 5 and name.isalpha()
    words = [k for k in known if short and (name in k.split("_") or k.startswith(name[:-1]))]
    return (close or words or [None])[0]


def resolve_grad_accum_steps(h: Hyperparameters, world_size: int) -> int:
    if not h.grad_accum_steps and 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size} does not divide 8; set GRAD_ACCUM_STEPS")
    steps = h.grad_accum_steps or 8 // world_size
    per_micro = world_size * steps * h.train_seq_len
    if h.train_batch_tokens % per_micro:
        raise ValueError(
            f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} does not split into whole sequences: it "
            f"must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN="
            f"{world_size}*{steps}*{h.train_seq_len}={per_micro}"
        )
    return steps


# ===== Data: shards and the distributed loader ====================================================

SHARD_MAGIC = 20240520  # header[0] of every fineweb_*.bin shard
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256  # int32 words before the uint16 tokens
BOS_ID = 1  # every document starts with it; the run takes the id from its tokenizer (bos_id)

DATA_HELP = (
    "download the published shards with `python3 data/cached_challenge_fineweb.py --variant "
    "sp1024`, or build an offline dataset with `python3 data/build_dataset.py`, then set "
    "DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE"
)


def read_shard_header(path: Path) -> int:
    """Token count of a shard, after checking its header and its size on disk."""
    if not path.is_file():
        raise ValueError(f"{path}: matches the shard pattern but is not a file; move it away")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard (bad magic or version); re-download or rebuild it")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + num_tokens * 2
    if path.stat().st_size != expected:
        raise ValueError(
            f"{path}: size {path.stat().st_size} bytes, header says {expected}; "
            "the file is truncated or corrupt, re-download or rebuild it"
        )
    return num_tokens


def load_data_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as uint16 (int64 per batch, not per shard), ids checked < vocab_size."""
    offset = SHARD_HEADER_INTS * 4
    tokens = np.fromfile(path, dtype="<u2", count=read_shard_header(path), offset=offset)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ValueError(
            f"{path}: token id {int(tokens[bad])} at position {bad} is >= VOCAB_SIZE={vocab_size}; "
            "the shards were made with another tokenizer, set VOCAB_SIZE/TOKENIZER_PATH to match"
        )
    return tokens


def shard_files(pattern: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; {DATA_HELP}")
    return files


def train_shards(h: Hyperparameters) -> str:
    return os.path.join(h.data_path, "fineweb_train_*.bin")


class TokenStream:
    """Reads shards in order, forever, wrapping around at the end; the position is (file_idx,
    pos). A background thread reads and checks the next shard: the timed loop never waits on it."""

    def __init__(self, pattern: str, vocab_size: int | None = None, file_idx=0, pos=0):
        self.files, self.vocab_size = shard_files(pattern), vocab_size
        self.file_idx, self.pos = file_idx, pos
        self.tokens = load_data_shard(self.files[file_idx], vocab_size)
        self.reader = ThreadPoolExecutor(max_workers=1)
        self.next_tokens = self.reader.submit(self._read, file_idx + 1)

    def _read(self, file_idx: int) -> np.ndarray:
        return load_data_shard(self.files[file_idx % len(self.files)], self.vocab_size)

    def take(self, n: int) -> np.ndarray:
        chunks, remaining = [], n
        while remaining > 0:
            if self.pos >= self.tokens.size:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = self.next_tokens.result(), 0
                self.next_tokens = self.reader.submit(self._read, self.file_idx + 1)
            k = min(remaining, self.tokens.size - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class DistributedTokenLoader:
    """Each call takes one contiguous span per rank of a shared stream: deterministic, disjoint."""

    def __init__(self, pattern, rank, world_size, device, vocab_size=None, position=(0, 0)):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(pattern, vocab_size, *position)

    @property
    def position(self) -> tuple[int, int]:
        return self.stream.file_idx, self.stream.pos

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1  # one extra token for the shifted targets
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern: str, min_tokens: int, vocab_size: int | None = None) -> Tensor:
    if sidecars := sorted(glob.glob(pattern.replace("fineweb_val_", "fineweb_val_bytes_"))):
        raise ValueError(f"{sidecars[0]}: CaseOps data, not scored here; build without --caseops")
    tokens = np.concatenate([load_data_shard(p, vocab_size) for p in shard_files(pattern)])
    if tokens.size < min_tokens + 1:
        raise ValueError(
            f"validation split {pattern} has {tokens.size} tokens; need at least {min_tokens + 1} "
            "(one sequence and its shifted target)"
        )
    return torch.from_numpy(tokens.astype(np.int32))


# ===== Byte counting for bits per byte ============================================================


@dataclass
class ByteLuts:
    """Per token id: UTF-8 bytes of the piece; does it start with "▁"; is it a boundary token."""

    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor

    def to(self, device) -> ByteLuts:
        tables = (self.base_bytes, self.has_leading_space, self.is_boundary)
        return ByteLuts(*(t.to(device) for t in tables))

    def count(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Each target's bytes: its leading space counts unless the previous token is a boundary."""
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids] + space.to(self.base_bytes.dtype)


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteLuts:
    n = max(sp.get_piece_size(), vocab_size)
    base_bytes = np.zeros(n, dtype=np.int64)
    has_leading_space = np.zeros(n, dtype=np.bool_)
    is_boundary = np.ones(n, dtype=np.bool_)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue  # 0 bytes, and a boundary: the next piece's "▁" is its own first byte
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1  # <0xNN> stands for exactly one byte
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    tables = (base_bytes, has_leading_space, is_boundary)
    return ByteLuts(*(torch.from_numpy(t) for t in tables))


def load_tokenizer(h: Hyperparameters, val_tokens: Tensor | None = None):
    """The SentencePiece model, checked against the data: the tokenizer the manifest names, or
    (without one) one that gives back the validation documents' ids (check_round_trip)."""
    if not Path(h.tokenizer_path).is_file():
        raise FileNotFoundError(f"no tokenizer at TOKENIZER_PATH={h.tokenizer_path}; {DATA_HELP}")
    try:
        sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"TOKENIZER_PATH={h.tokenizer_path} is not a SentencePiece model ({str(e).strip()}); "
            f"{DATA_HELP}"
        ) from None
    manifest, want = Path(h.data_path) / "manifest.json", None
    if h.check_tokenizer and manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            want = meta.get("tokenizer", {}).get("sha256")
        except (ValueError, AttributeError):
            raise ValueError(f"{manifest}: not a readable dataset manifest; rebuild it") from None
        have = hashlib.sha256(Path(h.tokenizer_path).read_bytes()).hexdigest()
        if want and want != have:
            raise ValueError(
                f"TOKENIZER_PATH={h.tokenizer_path} (sha256 {have[:12]}) is not the tokenizer the "
                f"shards in DATA_PATH={h.data_path} were made with ({manifest.name}: sha256 "
                f"{want[:12]}); point TOKENIZER_PATH at that one, or set CHECK_TOKENIZER=0"
            )
    if sp.get_piece_size() != h.vocab_size:
        raise ValueError(
            f"VOCAB_SIZE={h.vocab_size} but the tokenizer {h.tokenizer_path} has "
            f"{sp.get_piece_size()} pieces; set VOCAB_SIZE={sp.get_piece_size()}"
        )
    if h.check_tokenizer and not want and val_tokens is not None:
        check_round_trip(sp, val_tokens, h)
    return sp


ROUND_TRIP_DOCS = 64  # validation documents the tokenizer check decodes and encodes again


def check_round_trip(sp: spm.SentencePieceProcessor, tokens: Tensor, h: Hyperparameters) -> None:
    """The tokenizer that made the shards encodes a document's decoded text back to the same ids
    (control ids aside); another one gives other ids for almost every document. Fewer than 90 %
    of the first ROUND_TRIP_DOCS whole documents coming back is a wrong tokenizer."""
    ids = tokens[: 1 << 20].tolist()
    starts = [i for i, t in enumerate(ids) if t == sp.bos_id()]
    docs = [ids[a + 1 : b] for a, b in zip(starts, starts[1:], strict=False)][:ROUND_TRIP_DOCS]
    docs = [[t for t in doc if not sp.is_control(t)] for doc in docs]
    back = sum(sp.encode(sp.decode(doc)) == doc for doc in docs)
    if docs and back < 0.9 * len(docs):
        raise ValueError(
            f"TOKENIZER_PATH={h.tokenizer_path} gives back the ids of {back} of {len(docs)} "
            f"validation documents: it is not the tokenizer the shards in DATA_PATH={h.data_path} "
            "were made with; point TOKENIZER_PATH at that one, or set CHECK_TOKENIZER=0"
        )


# ===== Model ======================================================================================


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 master weight, computed in the activation dtype; fake-quantized in training on the
    export's grid when `configure_qat` gives it one."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat = None  # (max_level, clip_param, clip method) of the export when fake-quantized
        # 1/0 at run time: a tensor, so late QAT switches with no recompile and cannot be folded
        self.register_buffer("qat_on", torch.ones(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.training and self.qat is not None:
            w = fake_quantize(w, *self.qat, on=self.qat_on)
        return F.linear(x, w.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, dims: int, base: float):  # dims: how many of each head's dims rotate
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, dims, 2).float() / dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, D/2), fp32: bf16 angles lose it
        return freqs.cos()[None, None], freqs.sin()[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate dims (i, i + half) by the position's angles for i < half = cos.size(-1); later dims
    pass through."""
    half = cos.size(-1)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = (x1 * cos + x2 * sin, x2 * cos - x1 * sin)
    if 2 * half == x.size(-1):
        return torch.cat(rotated, dim=-1)
    return torch.cat((*rotated, x[..., 2 * half :]), dim=-1)


GATE_WINDOW = 12  # the sparse attention gate and the gated SmearGate read x[:12]


def document_mask(ids: Tensor, bos_id: int, packed: bool, flex: bool = False):
    """DOC_ATTENTION's mask (B, 1, T, K): a query sees the causal keys of its own document. Rows
    apart (evaluation windows): K = T, a document starts at each BOS. Packed (training: the B rows
    are one stream): K = 2T, the previous row's keys, then the row's own; a document longer than T
    is cut every T tokens from its start, as the record's varlen packing cuts it, so no piece needs
    keys from further back. Before a row's first BOS the row's tokens are one piece."""
    B, T = ids.shape
    flat = ids.reshape(1, -1) if packed else ids
    pos = torch.arange(flat.size(1), device=ids.device).expand_as(flat)
    start = torch.where(flat == bos_id, pos, 0).cummax(dim=1).values  # its document's first token
    start = (start + (pos - start) // T * T if packed else start).reshape(B, T)  # its piece's
    before = torch.cat((torch.full_like(start[:1], -1), start[:-1]))  # row 0's: -1, no one's start
    keys = torch.cat((before, start), dim=1) if packed else start
    if flex:  # the same mask as flex_attention's BlockMask: blocks no query sees are skipped

        def same_piece(b, h, q, k):
            return (start[b, q] == keys[b, k]) & (k <= q + keys.size(1) - T)

        return create_block_mask(same_piece, B, None, T, keys.size(1), device=ids.device)
    key_pos, query_pos = (torch.arange(n, device=ids.device) for n in (keys.size(1), T))
    causal = key_pos <= query_pos[:, None] + keys.size(1) - T  # query t is key t + K - T
    return ((start[:, :, None] == keys[:, None, :]) & causal)[:, None]


class CausalSelfAttention(nn.Module):
    """GQA attention with RoPE (partial with ROPE_DIMS), XSA on the last XSA_LAST_N layers, the
    DOC_ATTENTION mask when given one, and an optional per-head output gate: ATTN_GATE=dense is
    2 sigmoid(W x) (1 at init), sparse the record's sigmoid(W x[:12] / 2) (1/2 at init)."""

    def __init__(self, h: Hyperparameters, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = h.num_heads, h.num_kv_heads
        self.head_dim = h.model_dim // h.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(h.model_dim, h.model_dim)
        self.c_k = CastedLinear(h.model_dim, kv_dim)
        self.c_v = CastedLinear(h.model_dim, kv_dim)
        self.proj = CastedLinear(h.model_dim, h.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.rotary = Rotary(h.rope_dims or self.head_dim, h.rope_base)
        self.xsa = layer_idx >= h.num_layers - h.xsa_last_n
        gate_in = {"0": 0, "dense": h.model_dim, "sparse": GATE_WINDOW}[h.attn_gate]
        self.attn_gate = nn.Parameter(torch.zeros(h.num_heads, gate_in)) if gate_in else None
        self.dense_gate = h.attn_gate == "dense"

    def forward(self, x: Tensor, docs: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.c_q(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, KVH, D).transpose(1, 2)  # (B, KVH, T, D)
        v = self.c_v(x).view(B, T, KVH, D).transpose(1, 2)
        keys = k, v
        if (
            docs is not None and docs.shape[-1] > T
        ):  # packed: the previous row's (0 for row 0) first
            keys = tuple(torch.cat((torch.cat((t[:1] * 0, t[:-1])), t), dim=2) for t in keys)
        K = keys[0].size(2)
        cos, sin = self.rotary(K, x.device)  # the queries are the last T of the K positions
        # Norm, rotation and gain in fp32, then back to the compute dtype for attention.
        q = apply_rotary(rms_norm(q.float()), cos[:, :, K - T :], sin[:, :, K - T :])
        q = (q * self.q_gain[None, :, None, None]).to(v.dtype)
        k = apply_rotary(rms_norm(keys[0].float()), cos, sin).to(v.dtype)
        causal, gqa = dict(is_causal=True) if docs is None else dict(attn_mask=docs), KVH != H
        if not isinstance(docs, BlockMask):
            y = F.scaled_dot_product_attention(q, k, keys[1], **causal, enable_gqa=gqa)
        else:  # a BlockMask (CUDA)
            y = flex_attention(q, k, keys[1], block_mask=docs, enable_gqa=gqa)
        if self.xsa:  # remove from each head's output its component along the token's own value
            yg = y.view(B, KVH, H // KVH, T, D)
            vn = F.normalize(v, dim=-1)[:, :, None]  # (B, KVH, 1, T, D): shared by the group
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, H, T, D)
        if self.attn_gate is not None:
            g = F.linear(x[..., : self.attn_gate.size(1)], self.attn_gate.to(x.dtype))  # (B, T, H)
            gate = 2 * torch.sigmoid(g) if self.dense_gate else torch.sigmoid(0.5 * g)
            y = y * gate.transpose(1, 2)[..., None]
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(h.model_dim, h.mlp_mult * h.model_dim)
        self.proj = CastedLinear(h.mlp_mult * h.model_dim, h.model_dim, zero_init=True)
        self.leaky_slope = h.leaky_slope if h.mlp_act == "leaky_relu2" else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc(x)
        x = torch.relu(x) if self.leaky_slope is None else F.leaky_relu(x, self.leaky_slope)
        return self.proj(x.square())


class Block(nn.Module):
    def __init__(self, h: Hyperparameters, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(h, layer_idx)
        self.mlp = MLP(h)
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        mix = torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim)))
        self.resid_mix = nn.Parameter(mix)
        self.ln_scale = 1.0 / math.sqrt(layer_idx + 1) if h.ln_scale else None

    def norm(self, x: Tensor) -> Tensor:
        return rms_norm(x) if self.ln_scale is None else rms_norm(x) * self.ln_scale

    def forward(self, x: Tensor, x0: Tensor, docs: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0  # blend the residual stream with the embedding stream
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), docs)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))

    def parallel(self, lanes: list, x0: Tensor, resid: Tensor, post: Tensor, docs=None) -> list:
        """Attention reads lane 0 (blended with x0) and the MLP lane 1, side by side; lane k keeps
        resid[k] of itself, plus post[0, k] of the attention output and post[1, k] of the MLP's."""
        mix = self.resid_mix.to(x0.dtype)
        a = self.attn(self.norm(mix[0] * lanes[0] + mix[1] * x0), docs)
        a = self.attn_scale.to(x0.dtype) * a
        m = self.mlp_scale.to(x0.dtype) * self.mlp(self.norm(lanes[1]))
        resid, post = resid.to(x0.dtype), post.to(x0.dtype)
        return [resid[k] * lanes[k] + post[0, k] * a + post[1, k] * m for k in range(2)]


class SmearGate(nn.Module):
    """SMEAR_GATE=blend: x[t] <- (1-g) x[t] + g x[t-1] per channel, g = sigmoid(gate), 50/50 at
    init. gated (the record's): x[t] <- x[t] + lam sigmoid(W x[t][:12]) x[t-1], lam = W = 0 at
    init, the identity. Neither mixes at a BOS or at position 0."""

    def __init__(self, dim: int, bos_id: int = BOS_ID, kind: str = "blend"):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim if kind == "blend" else (1, GATE_WINDOW)))
        self.lam = nn.Parameter(torch.zeros(1)) if kind == "gated" else None
        self.bos_id = bos_id

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        x_prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, C), shifted right by one token
        blend = input_ids != self.bos_id
        blend[:, 0] = False  # the previous token is unknown here
        if self.lam is not None:
            g = torch.sigmoid(F.linear(x[..., :GATE_WINDOW], self.gate.to(x.dtype)))  # (B, T, 1)
            return x + blend[..., None].to(x.dtype) * self.lam.to(x.dtype) * g * x_prev
        g = torch.sigmoid(self.gate.to(x.dtype))
        return x + blend[..., None].to(x.dtype) * g * (x_prev - x)


class BigramHash(nn.Module):
    """An embedding of hash(previous, current token), projected to the model width, added to the
    token's. Position 0 and every BOS take the last bucket, their own: no pair spans documents."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)  # adds nothing until trained; the projection learns
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))
        self.bos_id = bos_id

    def indices(self, ids: Tensor) -> Tensor:
        own = self.embed.num_embeddings - 1
        # (B, T-1), int64: no overflow
        pair = torch.bitwise_xor(36313 * ids[:, 1:], 27191 * ids[:, :-1]) % own
        pair = torch.where(ids[:, 1:] == self.bos_id, own, pair)
        return torch.cat((torch.full_like(ids[:, :1], own), pair), dim=1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(self.indices(ids))) * self.scale


def virtual_layers(h: Hyperparameters, looping: bool) -> tuple[list[int], list[int]]:
    """(encoder, decoder): the physical layer each virtual layer runs. With the loops on, layers
    LOOP_START..LOOP_END run 1 + NUM_LOOPS times in a row; the first half is the encoder."""
    order = list(range(h.num_layers))
    if looping and h.num_loops:
        repeated = list(range(h.loop_start, h.loop_end + 1)) * (h.num_loops + 1)
        order[h.loop_start : h.loop_end + 1] = repeated
    return order[: len(order) // 2], order[len(order) // 2 :]


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters, bos_id: int = BOS_ID):
        super().__init__()
        self.logit_softcap = h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.smear = SmearGate(h.model_dim, bos_id, h.smear_gate) if h.smear_gate != "0" else None
        self.doc_attention, self.bos_id = h.doc_attention, bos_id  # True, or "flex" on CUDA
        self.num_encoder_layers = h.num_layers // 2
        self.layer_order = {looping: virtual_layers(h, looping) for looping in (False, True)}
        # Run the repeated layers: a Python flag, each value has its own compiled graph. Training
        # switches it (`train`); a trained model runs them.
        self.looping = False
        self.num_skips = min(map(len, self.layer_order[h.num_loops > 0]))
        self.parallel_start = h.parallel_residual_start
        if self.parallel_start:
            lanes = h.num_layers - self.parallel_start
            self.lane_resid = nn.Parameter(torch.full((lanes, 2), h.lane_resid_init))
            self.lane_post = nn.Parameter(torch.ones(lanes, 2, 2))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, h.model_dim))
        gates = nn.Parameter(torch.zeros(self.num_skips, h.model_dim)) if h.skip_gates else None
        self.skip_gates = gates
        self.blocks = nn.ModuleList(Block(h, i) for i in range(h.num_layers))
        self.lm_head = None
        if not h.tie_embeddings:
            self.lm_head = CastedLinear(h.model_dim, h.vocab_size, zero_init=True)
        self.bigram = None
        if h.bigram_buckets:
            self.bigram = BigramHash(h.bigram_buckets, h.bigram_dim, h.model_dim, bos_id)
        # ORTHO_INIT: the out-projections orthogonal / sqrt(2L) (scaled), or zero (zero_out)
        for name, module in self.blocks.named_modules() if h.ortho_init != "0" else ():
            if isinstance(module, CastedLinear):
                if h.ortho_init == "scaled" or not name.endswith(".proj"):
                    nn.init.orthogonal_(module.weight)
                if h.ortho_init == "scaled" and name.endswith(".proj"):
                    module.weight.data.mul_(1.0 / math.sqrt(2 * h.num_layers))

    def set_qat_active(self, active: bool) -> None:
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.qat_on.fill_(float(active))

    def add_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """U-Net: the j-th decoder layer's input takes in the j-th last encoder output."""
        skip = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, input_ids: Tensor, packed: bool = False) -> Tensor:
        """The final hidden states (B, T, C). packed, under DOC_ATTENTION: the rows are one stream
        (document_mask), and BigramHash and SmearGate read the previous row's last token too."""
        flex = self.doc_attention == "flex"
        docs = document_mask(input_ids, self.bos_id, packed, flex) if self.doc_attention else None
        ids = input_ids.reshape(1, -1) if packed and self.doc_attention else input_ids
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if self.smear is not None:
            x = self.smear(x, ids)
        x = x0 = rms_norm(x).view(*input_ids.shape, -1)
        encoder, decoder = self.layer_order[self.looping]  # physical layer of each virtual layer
        skips = []
        for i in encoder:
            x = self.blocks[i](x, x0, docs)
            skips.append(x)
        lanes = None  # from PARALLEL_RESIDUAL_START on: [attention lane, MLP lane]
        for j, i in enumerate(decoder):
            parallel = self.parallel_start and i >= self.parallel_start
            if parallel and lanes is None:
                lanes = [x, x]
            if skips and lanes is None:
                x = self.add_skip(j, x, skips.pop())
            elif skips:  # a skip joins the attention lane
                lanes[0] = self.add_skip(j, lanes[0], skips.pop())
            if parallel:
                k = i - self.parallel_start
                resid, post = self.lane_resid[k], self.lane_post[k]
                lanes = self.blocks[i].parallel(lanes, x0, resid, post, docs)
            else:
                x = self.blocks[i](x, x0, docs)
        return rms_norm(x if lanes is None else 0.5 * (lanes[0] + lanes[1]))

    def forward(self, input_ids, target_ids=None, *, score_last=0, reduction="mean", packed=False):
        """input_ids (B, T). No targets: logits (B, T, V). With targets: cross-entropy, mean or
        per token. score_last=k sends only the last k positions through the head; target_ids is
        then (B, k). packed: the rows are one stream, as training reads them."""
        x = self.hidden(input_ids, packed)  # (B, T, C)
        if score_last:
            x = x[:, -score_last:]
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight.to(x.dtype)).float()
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if target_ids is None:
            return logits
        flat_logits, flat_targets = logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1)
        loss = F.cross_entropy(flat_logits, flat_targets, reduction=reduction)
        return loss if reduction == "mean" else loss.view(target_ids.shape)


def build_model(h: Hyperparameters, device: torch.device, bos_id: int = BOS_ID) -> GPT:
    """The model on the device, QAT configured; under DOC_ATTENTION, CUDA runs flex_attention."""
    model = GPT(h, bos_id).to(device)
    if h.doc_attention and device.type == "cuda":
        model.doc_attention = "flex"
    configure_qat(model, h)
    return model


def model_flops_per_token(h: Hyperparameters, model: GPT) -> float:
    """Training FLOPs per token: 6 per matmul weight plus attention (PaLM's 6N + 12 L d T)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "blocks." in n)
    matmul += h.vocab_size * h.model_dim  # the output head, tied or not
    return 6.0 * matmul + 12.0 * h.num_layers * h.model_dim * h.train_seq_len


# How each tensor is treated. Every per-tensor decision (optimizer group, QAT, export kind, clip,
# GPTQ calibration) reads the tensor's role here and nowhere else.
@dataclass(frozen=True)
class RoleRules:
    optimizer: str  # embed, head (Adam, own LR), matrix (Muon, QAT, GPTQ on its inputs), scalar
    export: str  # the artifact's kind, or the setting that names it (embed_quant, *_bits)
    sdclip_k: str  # the setting of its rows' SDClip k


ROLE_RULES = {
    "embedding": RoleRules("embed", "embed_quant", "sdclip_k_embed"),  # the token table
    "head": RoleRules("head", "int8", "sdclip_k_embed"),  # an untied output head
    "bigram_table": RoleRules("embed", "int8", "sdclip_k_embed"),
    "attention": RoleRules("matrix", "attn_bits", "sdclip_k_attn"),  # Q, K, V, out
    "projection": RoleRules("matrix", "attn_bits", "sdclip_k_attn"),  # BigramHash's to MODEL_DIM
    "mlp": RoleRules("matrix", "mlp_bits", "sdclip_k_mlp"),
    "gate": RoleRules("scalar", "int8", "sdclip_k_attn"),  # attention gates: controls, as matrices
    "control": RoleRules("scalar", "control_quant", ""),  # vectors, scalars, mixes, skips, lanes
}


def tensor_role(name: str, tensor: Tensor) -> str:
    """The role (a key of ROLE_RULES) of a parameter of GPT, by its name and shape."""
    named = {"tok_emb.weight": "embedding", "lm_head.weight": "head"}
    named |= {"bigram.embed.weight": "bigram_table", "bigram.proj.weight": "projection"}
    if name in named:
        return named[name]
    if name.endswith(".attn_gate"):
        return "gate"
    if tensor.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight"):
        return "mlp" if ".mlp." in name else "attention"
    return "control"


# ===== Optimizers and schedules ===================================================================

NEWTON_SCHULZ = {
    "quintic": ((3.4445, -4.7750, 2.0315),),  # one tuple for every iteration (Muon's original)
    # Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one minimax-optimal
    # tuple per iteration, as the challenge's records use (PR #1344); later ones repeat the last.
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}  # fmt: skip


def zeropower_via_newtonschulz5(
    g: Tensor, steps: int, eps: float = 1e-7, coefficients: tuple = NEWTON_SCHULZ["quintic"]
) -> Tensor:
    """Approximately orthogonalize g (singular values into a band around 1): quintic iterations."""
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalized updates for 2-D matrices. Rank r orthogonalizes
    parameters r, r+W, r+2W, ...; the flat updates are summed across ranks so every rank applies the
    same update. Gradients must already be averaged across ranks (DDP does it). `row_norm` is
    MuonEq-R; `ns` names the Newton-Schulz coefficients."""

    def __init__(self, params, zeropower=None, row_norm=False, ns="quintic", **defaults):
        """defaults: lr, momentum, backend_steps; nesterov (True) and weight_decay (0) optional."""
        super().__init__(params, {"nesterov": True, "weight_decay": 0.0, **defaults})
        self.zeropower = zeropower or zeropower_via_newtonschulz5
        self.row_norm, self.coefficients = row_norm, NEWTON_SCHULZ[ns]

    def update(self, p: Tensor, group: dict) -> Tensor:
        """The orthogonalized update of one matrix from its gradient and momentum."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if self.row_norm:  # MuonEq-R: every row of the update gets the same norm
            g = g / g.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(g.dtype)
        g = self.zeropower(g, steps=group["backend_steps"], coefficients=self.coefficients)
        return g * max(1.0, g.size(0) / g.size(1)) ** 0.5  # equal RMS for tall and wide matrices

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    flat[offset : offset + p.numel()] = self.update(p, group).reshape(-1)
                offset += p.numel()
            if world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:  # decoupled, with the scheduled LR
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                update = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
                p.add_(update, alpha=-group["lr"])
                offset += p.numel()


def optimizer_group(name: str, p: Tensor) -> str:
    """By role: embed (token, bigram tables), head (untied), matrix (Muon) or scalar (Adam)."""
    return ROLE_RULES[tensor_role(name, p)].optimizer


def build_optimizers(h: Hyperparameters, model: GPT, zeropower, fused: bool) -> list:
    """Muon for the matrices; Adam for the embeddings, the head, and vectors/scalars."""
    groups = {"embed": [], "head": [], "matrix": [], "scalar": []}
    for name, p in model.named_parameters():
        groups[optimizer_group(name, p)].append(p)

    def adam(name: str, lr: float, wd: float) -> torch.optim.AdamW:
        # AdamW: decoupled weight decay; base_lr is what the schedule scales
        group = {"params": groups[name], "lr": lr, "base_lr": lr}
        betas = (h.beta1, h.beta2)
        return torch.optim.AdamW([group], betas=betas, eps=h.adam_eps, fused=fused, weight_decay=wd)

    embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
    steps = dict(lr=h.matrix_lr, momentum=h.muon_momentum, backend_steps=h.muon_backend_steps)
    matrices = [{"params": groups["matrix"], "base_lr": h.matrix_lr}]
    muon = Muon(matrices, zeropower, h.muon_row_norm, h.muon_ns, weight_decay=h.muon_wd, **steps)
    optimizers = [adam("embed", embed_lr, h.embed_wd), muon, adam("scalar", h.scalar_lr, h.adam_wd)]
    if groups["head"]:
        optimizers.append(adam("head", h.head_lr, h.adam_wd))
    return optimizers


class EMA:
    """An fp32 EMA of every parameter, updated on the device each step (no host sync)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.names = decay, [n for n, _ in model.named_parameters()]
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def load(self, state: dict[str, Tensor]) -> None:
        for name, t in zip(self.names, self.shadow, strict=True):
            t.copy_(state[name])


def lr_multiplier(
    step, elapsed_ms, *, iterations, warmdown_iters, max_wallclock_ms, warmdown_frac=0.0, min_lr=0.0
) -> float:
    """LR scale: 1, then a linear warmdown to MIN_LR over the end of training. WARMDOWN_FRAC > 0:
    the warmdown spans that fraction of the wall-clock cap (of ITERATIONS without one). Else it
    spans the last WARMDOWN_ITERS steps; under a wall-clock cap it starts when the time left equals
    WARMDOWN_ITERS steps at the mean step time so far: the LR reaches MIN_LR when the cap does."""
    if warmdown_frac > 0:
        by_time = max_wallclock_ms is not None
        total, done = (max_wallclock_ms, elapsed_ms) if by_time else (iterations, step)
        remaining, span = max(total - done, 0.0), warmdown_frac * total
        frac = remaining / span if remaining < span else 1.0
    elif warmdown_iters <= 0:
        return 1.0
    elif max_wallclock_ms is None:
        warmdown_start = max(iterations - warmdown_iters, 0)
        in_warmdown = warmdown_start <= step < iterations
        frac = max((iterations - step) / warmdown_iters, 0.0) if in_warmdown else 1.0
    else:
        warmdown_ms = warmdown_iters * (elapsed_ms / max(step, 1))  # at the mean step time so far
        remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
        frac = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return min_lr + (1.0 - min_lr) * frac


def muon_momentum_at(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


# ===== Quantization and the artifact: one grid for the training forward (QAT) and the export ======

FP16_MAX = 65504.0
DIVERGED = "training diverged: lower the learning rates or set GRAD_CLIP_NORM"
KEPT = "the raw weights are kept"
WEIGHT_RMS_LIMIT = 100.0  # trained weights of these models have RMS below about 2: a diverged run
MIN_SCALE = 2.0**-24  # smallest fp16 subnormal: keeps the scale representable, swallows nothing
SEARCH_CLIP_FRACTIONS = tuple(1.0 - 0.05 * i for i in range(11))  # CLIP=search tries these


def round_to_fp16_grid(x: Tensor) -> Tensor:
    """x (positive fp32) rounded to the nearest fp16 value, kept in fp32. Written as arithmetic
    because torch.compile drops an fp32->fp16->fp32 cast pair, which would let the compiled training
    forward quantize with a different scale than the export."""
    _, exponent = torch.frexp(x)
    # fp16: 11 significant bits, subnormal step 2^-24
    ulp = torch.exp2((exponent - 11).clamp_min(-24).float())
    return torch.round(x / ulp) * ulp


def level_of(kind: str) -> int:
    """The largest level of an intN kind: levels run -L..L, L = 2^(N-1) - 1 (int6: 31)."""
    return 2 ** (int(kind[3:]) - 1) - 1


def row_scales(w: Tensor, max_level: int, clip_param: float, method: str = "percentile") -> Tensor:
    """Per-row scales (fp32 values on the fp16 grid) of a 2-D fp32 tensor, from each row's clip:
    the nearest-rank percentile clip_param of |w| (at 100 and for short rows: the row max);
    clip_param standard deviations (sdclip); or the row max's fraction that rounds best (search)."""
    absw, n = w.abs(), w.shape[1]
    k = math.ceil(round(clip_param * n / 100.0, 9))  # 99.9/100*1000 is 999.0000000000001 in floats
    if method == "sdclip":
        clip = clip_param * w.std(dim=1)
    elif method == "search" or k >= n:
        clip = absw.amax(dim=1)
    else:
        clip = absw.kthvalue(max(k, 1), dim=1).values
    scale = round_to_fp16_grid((clip / max_level).clamp_min(MIN_SCALE))
    if method == "search":
        best_error = torch.full_like(scale, math.inf)
        for fraction in SEARCH_CLIP_FRACTIONS:
            s = round_to_fp16_grid((clip * fraction / max_level).clamp_min(MIN_SCALE))[:, None]
            q = torch.clamp(torch.round(w / s), -max_level, max_level)
            error = (q * s - w).square().sum(1)
            scale = torch.where(error < best_error, s[:, 0], scale)
            best_error = torch.minimum(error, best_error)
    return scale


def quantize_per_row(
    w: Tensor, max_level: int, clip_param: float, method: str = "percentile"
) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: integer levels (int8) and fp16 scales."""
    w = w.float()
    scale = row_scales(w, max_level, clip_param, method)
    q = torch.clamp(torch.round(w / scale[:, None]), -max_level, max_level).to(torch.int8)
    return q, scale.to(torch.float16)


def dequantize_per_row(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def fake_quantize(w: Tensor, max_level: int, clip_param: float, method="percentile", on=1.0):
    """Forward: the dequantized export if on = 1, w if on = 0; backward: the identity (STE)."""
    q, scale = quantize_per_row(w.detach(), max_level, clip_param, method)
    return w + on * (dequantize_per_row(q, scale).to(w.dtype) - w).detach()


def export_kind(name: str, tensor: Tensor, h: Hyperparameters) -> str:
    """How the artifact stores a tensor: fp16 (FP16_KEEP), else by its role (ROLE_RULES):
    EMBED_QUANT, intN (MLP_BITS / ATTN_BITS), int8, or CONTROL_QUANT."""
    if any(fnmatch.fnmatchcase(name, p.strip()) for p in h.fp16_keep.split(",") if p.strip()):
        return "fp16"
    export = ROLE_RULES[tensor_role(name, tensor)].export
    bits = {"mlp_bits": f"int{h.mlp_bits}", "attn_bits": f"int{h.attn_bits}"}
    by_setting = bits | {"embed_quant": h.embed_quant, "control_quant": h.control_quant}
    return by_setting.get(export, export)


def clip_rule(name: str, tensor: Tensor, h: Hyperparameters) -> tuple[float, str]:
    """(clip_param, method) of a tensor's per-row clip: CLIP, with SDClip's k by its role."""
    if h.clip != "sdclip":
        return h.quant_clip_percentile, h.clip
    return getattr(h, ROLE_RULES[tensor_role(name, tensor)].sdclip_k), "sdclip"


def quantized_matrix(name: str, tensor: Tensor, h: Hyperparameters) -> bool:
    """A Muon matrix stored as integers: QAT fake-quantizes it; GPTQ calibrates on its inputs."""
    matrix = ROLE_RULES[tensor_role(name, tensor)].optimizer == "matrix"
    return matrix and export_kind(name, tensor, h).startswith("int")


def configure_qat(model: GPT, h: Hyperparameters) -> None:
    """QAT on: every quantized matrix fake-quantized on exactly the export's grid."""
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            key, w = f"{name}.weight", module.weight
            on = h.qat and quantized_matrix(key, w, h)
            module.qat = (level_of(export_kind(key, w, h)), *clip_rule(key, w, h)) if on else None


def collect_hessians(model: GPT, h: Hyperparameters, rt: Runtime, grad_accum_steps: int) -> dict:
    """GPTQ's H = sum of x^T x over the inputs of every quantized matrix, from training batches
    only (calibration never reads the validation split), summed over the ranks. The tied
    embedding's inputs as the output head are the final hidden states."""
    hessians: dict[str, Tensor] = {}
    last: list = [None, None]  # the last input and its x^T x: Q, K and V read the same input

    def add(name: str, x: Tensor) -> None:  # summed in fp64: the same sum however ranks split it
        if x is not last[0]:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            last[:] = [x, (flat.T @ flat).double()]
        hessians[name] = hessians.get(name, 0) + last[1]  # a new tensor, never an alias

    hooks = [
        m.register_forward_pre_hook(lambda _, args, key=f"{n}.weight": add(key, args[0]))
        for n, m in model.named_modules()
        if isinstance(m, CastedLinear) and quantized_matrix(f"{n}.weight", m.weight, h)
    ]
    ranks = (rt.rank, rt.world_size, rt.device)
    loader = DistributedTokenLoader(train_shards(h), *ranks, h.vocab_size)
    local_tokens = h.train_batch_tokens // (rt.world_size * grad_accum_steps)
    batches = max(1, math.ceil(h.gptq_calib_tokens / (local_tokens * rt.world_size)))
    emb = model.tok_emb.weight
    tied = model.lm_head is None and export_kind("tok_emb.weight", emb, h).startswith("int")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), rt.autocast():
            for _ in range(batches):
                hidden = model.hidden(loader.next_batch(local_tokens, h.train_seq_len)[0], True)
                if tied:
                    add("tok_emb.weight", hidden)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
        last.clear()
    for hessian in hessians.values() if rt.distributed else ():
        dist.all_reduce(hessian)
    return {name: hessian.float() for name, hessian in hessians.items()}


def gptq_quantize(
    w: Tensor, hessian: Tensor, max_level: int, scale: Tensor, block: int = 128, damp: float = 0.01
) -> Tensor:
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323): the levels of w (out, in) on the rows' grids,
    chosen column by column by decreasing Hessian diagonal (act order), each column's rounding
    error fed forward to the later columns through the upper Cholesky factor of the damped inverse
    Hessian, in blocks. H = I gives round-to-nearest exactly. In fp32 (fp64 for an fp64 w)."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    w, s = w.to(dtype).clone(), scale.to(w.device, dtype)
    hessian = hessian.to(w.device, dtype).clone()
    dead = hessian.diagonal() == 0  # inputs never seen: nothing to preserve
    hessian[dead, dead], w[:, dead] = 1.0, 0.0
    perm = torch.argsort(hessian.diagonal(), descending=True)
    w, hessian = w[:, perm], hessian[perm][:, perm]
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block):
        i2 = min(i1 + block, w.shape[1])
        errors = torch.zeros_like(w[:, i1:i2])
        for i in range(i1, i2):
            q[:, i] = torch.clamp(torch.round(w[:, i] / s), -max_level, max_level)
            errors[:, i - i1] = (w[:, i] - q[:, i] * s) / u[i, i]
            w[:, i:i2] -= errors[:, i - i1, None] * u[i, i:i2]
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)


ARTIFACT_MAGIC = b"PGOLF-Q\x00"  # 8 bytes before the stream table
ARTIFACT_FORMAT_VERSION = 3  # 3: the packed runs in separately compressed streams
REEXPORT = "re-export it from the raw checkpoint"  # how a damaged or outdated artifact is replaced
ARTIFACT_KINDS = ("int5", "int6", "int7", "int8", "fp16", "float")
STREAMS_MAGIC = b"PGS3"  # the stream table: count, then (codec, length) per stream
STREAM_ENTRY = struct.Struct("<BQ")
CODECS = ("zstd", "lzma", "brotli")  # a stream's codec, by its number in the table
# The packed payload's runs, stored as raw bytes: their types are the reader's, not the file's.
RUN_DTYPES = {"q": "i1", "scale": "<f2", "float": "<f4", "fp16_planes": "u1", "lqer_q": "i1",
              "lqer_scale": "<f2"}  # fmt: skip


class ArtifactError(ValueError):
    pass


def quantize_tensor(name: str, t: Tensor, kind: str, h: Hyperparameters, hessian=None) -> dict:
    """One tensor's payload entry in an export kind: levels and row scales (GPTQ when it has a
    Hessian), or its values in fp16 / fp32."""
    t = t.detach()
    if not kind.startswith("int"):
        return {"kind": kind, "data": t.cpu().half() if kind == "fp16" else t.cpu().float().clone()}
    max_level, (clip_param, method) = level_of(kind), clip_rule(name, t, h)
    if hessian is None:
        q, scale = quantize_per_row(t, max_level, clip_param, method)
    else:
        scale = row_scales(t.float(), max_level, clip_param, method)
        q, scale = gptq_quantize(t, hessian, max_level, scale), scale.to(torch.float16)
    return {"kind": kind, "q": q.cpu(), "scale": scale.cpu()}


def quantize_state_dict(state: dict, h: Hyperparameters, hessians: dict | None = None) -> dict:
    """The artifact's payload: every tensor in its export kind; GPTQ for the matrices that have a
    Hessian; LQER corrections when LQER_RANK is on."""
    hessians, kinds = hessians or {}, {n: export_kind(n, t, h) for n, t in state.items()}
    entries = {n: quantize_tensor(n, t, kinds[n], h, hessians.get(n)) for n, t in state.items()}
    return make_payload(entries, state, h)


def make_payload(entries: dict[str, dict], state: dict[str, Tensor], h: Hyperparameters) -> dict:
    """The payload of quantized entries (in the state dict's order), with LQER when it is on."""
    entries = {name: dict(entries[name]) for name in state}
    if h.lqer_rank:
        add_lqer(entries, state, h)
    made_with = {"quant_method": h.quant_method, "clip": h.clip, "compressor": h.compressor}
    head = {"format": "pgolf-int6", "version": ARTIFACT_FORMAT_VERSION}
    return head | {"tensors": entries, "made_with": made_with}


LQER_GROUP = 64  # values of B per int4 scale


def add_lqer(entries: dict, state: dict[str, Tensor], h: Hyperparameters) -> None:
    """LQER (low-rank quantization-error reconstruction, as the 1.0611 record): for the
    LQER_TOP_K quantized matrices and embedding with the largest error E = W - dequantized(W),
    store E's best rank-LQER_RANK approximation A @ B (truncated SVD, A = U S, B = V^T) with A in
    int2 ([-2, 1], one scale) and B in int4 ([-8, 7], one scale per LQER_GROUP values)."""
    errors = {}
    for name, e in entries.items():
        if "q" in e and ROLE_RULES[tensor_role(name, e["q"])].optimizer in ("matrix", "embed"):
            errors[name] = state[name].detach().cpu().float() - dequantize_entry(e)
    ranked = sorted(errors, key=lambda n: (-errors[n].norm().item(), n))
    for name in ranked[: h.lqer_top_k]:
        u, sv, vh = torch.linalg.svd(errors[name], full_matrices=False)
        r = min(h.lqer_rank, sv.numel())
        a, b = u[:, :r] * sv[:r], vh[:r]
        a_scale = (a.abs().amax().clamp_min(1e-10) / 1.5).to(torch.float16).reshape(1)
        groups = b.reshape(-1, lqer_group(b.shape))
        b_scale = (groups.abs().amax(dim=1).clamp_min(1e-10) / 7.5).to(torch.float16)
        qa = torch.clamp(torch.round(a / a_scale.float()), -2, 1).to(torch.int8)
        qb = torch.clamp(torch.round(groups / b_scale.float()[:, None]), -8, 7).to(torch.int8)
        entries[name] |= {"lqer_a": qa, "lqer_a_scale": a_scale}
        entries[name] |= {"lqer_b": qb.reshape(b.shape), "lqer_b_scale": b_scale}


def lqer_group(b_shape) -> int:
    """Values of B per scale: LQER_GROUP, or a row where LQER_GROUP does not divide B."""
    return LQER_GROUP if math.prod(b_shape) % LQER_GROUP == 0 else b_shape[1]


def dequantize_entry(e: dict) -> Tensor:
    if "q" not in e:
        return e["data"].float()
    w = dequantize_per_row(e["q"], e["scale"])
    if "lqer_a" in e:
        b = e["lqer_b"].reshape(e["lqer_b_scale"].numel(), -1).float()
        b = (b * e["lqer_b_scale"].float()[:, None]).reshape(e["lqer_b"].shape)
        w = w + (e["lqer_a"].float() * e["lqer_a_scale"].float()) @ b
    return w


def dequantize_state_dict(payload: dict) -> dict[str, Tensor]:
    return {name: dequantize_entry(e) for name, e in payload["tensors"].items()}


def check_exportable(state: dict[str, Tensor], h: Hyperparameters) -> None:
    """A broken model is never shipped: every weight finite, within the range its export format
    holds, and of an RMS no trained model reaches (a diverged run whose loss stayed finite)."""
    for name, t in state.items():
        kind = export_kind(name, t, h)
        limit = FP16_MAX * (level_of(kind) if kind.startswith("int") else 1)
        limit = math.inf if kind == "float" else limit
        rms = t.float().square().mean().sqrt().item()
        if not torch.isfinite(t).all():
            raise BrokenModel(f"weight {name} has non-finite values: {DIVERGED}; {KEPT}")
        if t.abs().max() > limit:
            raise BrokenModel(
                f"weight {name} reaches {t.abs().max().item():.4g}, beyond what its {kind} export "
                f"holds (fp16 max {FP16_MAX:.0f}); {KEPT}"
            )
        if rms > WEIGHT_RMS_LIMIT:
            raise BrokenModel(
                f"weight {name} has RMS {rms:.4g}, beyond any trained model's "
                f"({WEIGHT_RMS_LIMIT:g}): {DIVERGED}; {KEPT}"
            )


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def stream_group(name: str, tensor: Tensor) -> str:
    """The stream of a tensor's levels, one per matrix type (the token table, each attention and MLP
    matrix across the layers, ...): levels of a type compress better apart (README, "Measured")."""
    role = tensor_role(name, tensor)
    return f"{role}.{name.split('.')[-2]}" if role in ("attention", "mlp") else role


def packing_order(tensors: dict[str, dict]) -> list[str]:
    """The tensors' order in the runs: by stream group, then as in the state dict."""
    groups = {n: stream_group(n, e.get("q", e.get("data"))) for n, e in tensors.items()}
    first = {g: i for i, g in reversed(list(enumerate(groups.values())))}
    return sorted(tensors, key=lambda n: first[groups[n]])


def pack_payload(payload: dict) -> dict:
    """The payload as an index plus one run per kind of content: levels (by stream group), scales,
    fp32 data, fp16 data as a low-byte plane then a high-byte plane."""
    tensors = payload["tensors"]
    names = packing_order(tensors)

    def run(key: str, kinds: tuple, dtype) -> Tensor:
        parts = [tensors[n][key].flatten() for n in names if tensors[n]["kind"] in kinds]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    def index(n: str) -> list:  # [name, kind, shape], with LQER plus the correction's rank
        e = tensors[n]
        entry = [n, e["kind"], list(e["q" if "q" in e else "data"].shape)]
        return entry + [e["lqer_a"].shape[1]] if "lqer_a" in e else entry

    ints = tuple(k for k in ARTIFACT_KINDS if k.startswith("int"))
    fp16 = run("data", ("fp16",), torch.float16)
    packed = {
        **{k: v for k, v in payload.items() if k != "tensors"},
        "q": run("q", ints, torch.int8),
        "scale": run("scale", ints, torch.float16),
        "float": run("data", ("float",), torch.float32),
        "fp16_planes": fp16.view(torch.uint8).view(-1, 2).T.contiguous(),
        "index": [index(n) for n in names],
    }
    lqer = [tensors[n] for n in names if "lqer_a" in tensors[n]]
    if lqer:  # LQER off: no runs, the same bytes as before it existed
        packed["lqer_q"] = torch.cat([e[k].flatten() for e in lqer for k in ("lqer_a", "lqer_b")])
        scales = [e[k] for e in lqer for k in ("lqer_a_scale", "lqer_b_scale")]
        packed["lqer_scale"] = torch.cat(scales)
    return packed


def unpack_payload(packed: dict) -> dict[str, dict]:
    """The tensors back from pack_payload's runs; any inconsistency raises ValueError."""
    runs = {k: packed[k] for k in ("q", "scale", "float")}
    runs["fp16"] = packed["fp16_planes"].reshape(2, -1).T.reshape(-1).view(torch.float16)
    runs["lqer_q"] = packed.get("lqer_q", torch.zeros(0, dtype=torch.int8))
    runs["lqer_scale"] = packed.get("lqer_scale", torch.zeros(0, dtype=torch.float16))
    dtypes = {"q": torch.int8, "scale": torch.float16, "float": torch.float32}
    dtypes |= {"fp16": torch.float16, "lqer_q": torch.int8, "lqer_scale": torch.float16}
    if any(not isinstance(t, Tensor) or t.dtype != dtypes[k] for k, t in runs.items()):
        raise ValueError("a run has the wrong type")
    taken, tensors = dict.fromkeys(runs, 0), {}

    def take(key: str, shape: list) -> Tensor:
        n = math.prod(shape)
        part = runs[key].flatten()[taken[key] : taken[key] + n]
        if part.numel() != n:
            raise ValueError(f"the {key} run ends early")
        taken[key] += n
        return part.view(shape)

    for name, kind, shape, *lqer in packed["index"]:
        dims = [*shape, *lqer]
        if kind not in ARTIFACT_KINDS or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ValueError(f"entry {name!r} is malformed")
        if not kind.startswith("int"):
            tensors[name] = {"kind": kind, "data": take(kind, shape)}
            continue
        tensors[name] = {"kind": kind, "q": take("q", shape), "scale": take("scale", shape[:1])}
        if lqer:  # A (out, rank) and B (rank, in), then their scales
            (rank,), (rows, cols) = lqer, shape
            a, b = take("lqer_q", [rows, rank]), take("lqer_q", [rank, cols])
            a_scale = take("lqer_scale", [1])
            b_scale = take("lqer_scale", [rank * cols // lqer_group([rank, cols])])
            tensors[name] |= {"lqer_a": a, "lqer_a_scale": a_scale, "lqer_b": b}
            tensors[name] |= {"lqer_b_scale": b_scale}
    if any(taken[k] != runs[k].numel() for k in runs):
        raise ValueError("the runs hold more than the index names")
    return tensors


def compress(data: bytes, codec: str, zstd_level: int = 22) -> bytes:
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=zstd_level, write_checksum=True).compress(data)
    if codec == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    return brotli.compress(data, quality=11)


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    return lzma.decompress(data) if codec == "lzma" else brotli.decompress(data)


def level_groups(tensors: dict[str, dict]) -> dict[str, int]:
    """The stream groups of the levels, in the order of their streams, with their level counts."""
    counts: dict[str, int] = {}
    for name in packing_order(tensors):
        if "q" in tensors[name]:
            group = stream_group(name, tensors[name]["q"])
            counts[group] = counts.get(group, 0) + tensors[name]["q"].numel()
    return counts


def payload_streams(payload: dict) -> list[bytes]:
    """The packed payload as streams: a header (torch.save of everything but the runs, and the
    stream manifest), then the raw bytes of each run, the levels cut at their stream groups."""
    packed = pack_payload(payload)
    level_counts = level_groups(payload["tensors"])
    parts, offset = [], 0
    for count in level_counts.values():  # int8: one byte a level
        parts.append(("q", packed["q"][offset : offset + count]))
        offset += count
    parts += [(run, packed[run]) for run in RUN_DTYPES if run != "q" and run in packed]
    manifest = [[run, t.numel() * t.element_size()] for run, t in parts]
    header = {k: v for k, v in packed.items() if k not in RUN_DTYPES} | {"streams": manifest}
    return [torch_save_bytes(header)] + [t.contiguous().numpy().tobytes() for _, t in parts]


def artifact_bytes(
    payload: dict, zstd_level: int, compressor: str = "zstd", cache: dict | None = None
) -> bytes:
    """The artifact: ARTIFACT_MAGIC, the stream table, the streams, each compressed with
    COMPRESSOR or (auto) with whichever codec makes it smallest. Streams compress in threads;
    `cache` keeps each stream's result by its content, for artifacts that differ in a few."""
    streams, cache = payload_streams(payload), {} if cache is None else cache
    codecs = CODECS if compressor == "auto" else (compressor,)
    how = f"{compressor}-{zstd_level}".encode()
    keys = [hashlib.sha256(data).digest() + how for data in streams]
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        jobs = {
            key: [pool.submit(compress, data, c, zstd_level) for c in codecs]
            for key, data in zip(keys, streams, strict=True)
            if key not in cache
        }
        for key, js in jobs.items():  # the smallest; ties: the first codec
            cache[key] = min((len(job.result()), i, job.result()) for i, job in enumerate(js))
    table = STREAMS_MAGIC + struct.pack("<I", len(streams))
    for key in keys:
        table += STREAM_ENTRY.pack(CODECS.index(codecs[cache[key][1]]), cache[key][0])
    return ARTIFACT_MAGIC + table + b"".join(cache[key][2] for key in keys)


def stream_table(body: bytes) -> list[tuple[str, int]]:
    """(codec, compressed length) of each stream of an artifact's body (after ARTIFACT_MAGIC);
    ValueError if the table does not add up to the body."""
    if body[:4] != STREAMS_MAGIC or len(body) < 8:
        raise ValueError("no stream table")
    (count,) = struct.unpack_from("<I", body, 4)
    start = 8 + count * STREAM_ENTRY.size
    if count == 0 or start > len(body):
        raise ValueError(f"a stream table of {count} streams does not fit")
    entries = [STREAM_ENTRY.unpack_from(body, 8 + i * STREAM_ENTRY.size) for i in range(count)]
    if any(codec >= len(CODECS) for codec, _ in entries):
        raise ValueError("unknown codec")
    if start + sum(length for _, length in entries) != len(body):
        raise ValueError("the streams' lengths do not add up to the file")
    return [(CODECS[codec], length) for codec, length in entries]


def read_streams(body: bytes) -> list[bytes]:
    """The decompressed streams of an artifact's body."""
    table = stream_table(body)
    start, streams = 8 + len(table) * STREAM_ENTRY.size, []
    for codec, length in table:
        streams.append(decompress(body[start : start + length], codec))
        start += length
    return streams


def packed_from_streams(header: dict, streams: list[bytes]) -> dict:
    """pack_payload's dict back from the header and the runs' raw streams."""
    manifest = header.pop("streams")
    if [n for _, n in manifest] != [len(s) for s in streams]:
        raise ValueError("the streams do not match the manifest")
    runs = {run: bytearray() for run in RUN_DTYPES if run in ("q", "scale", "float", "fp16_planes")}
    for (run, _), data in zip(manifest, streams, strict=True):
        runs.setdefault(run, bytearray()).extend(data)
    arrays = {run: np.frombuffer(data, dtype=RUN_DTYPES[run]) for run, data in runs.items()}
    return header | {run: torch.from_numpy(a) for run, a in arrays.items()}


def read_artifact(path: Path) -> dict:
    """Load an artifact without executing code from it (weights_only for the header, raw bytes
    for the runs), with clear errors on damage."""
    blob = Path(path).read_bytes()
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ArtifactError(f"{path}: not an artifact of this script (bad magic)")
    damage = (ValueError, struct.error, MemoryError, zstandard.ZstdError, lzma.LZMAError)
    try:  # MemoryError: a damaged size field can declare an absurd size
        streams = read_streams(blob[len(ARTIFACT_MAGIC) :])
    except (*damage, brotli.error) as e:
        raise ArtifactError(
            f"{path}: truncated or corrupt artifact ({str(e) or type(e).__name__}); {REEXPORT}"
        ) from None
    try:
        payload = torch.load(io.BytesIO(streams[0]), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ArtifactError(f"{path}: unreadable payload ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != "pgolf-int6":
        raise ArtifactError(f"{path}: payload is not a pgolf-int6 artifact")
    if payload.get("version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {payload.get('version')}, this script reads "
            f"version {ARTIFACT_FORMAT_VERSION}; {REEXPORT}"
        )
    try:
        payload["tensors"] = unpack_payload(packed_from_streams(payload, streams[1:]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ArtifactError(
            f"{path}: malformed artifact payload ({type(e).__name__}: {e}); {REEXPORT}"
        ) from None
    return payload


AUTO_BITS = range(5, 9)  # the widths BITS=auto chooses from
AUTO_SETTINGS = ("embed_quant", "mlp_bits", "attn_bits")  # it sets the groups of these roles


def quantization_error(w: Tensor, entry: dict, hessian: Tensor | None) -> float:
    """GPTQ's objective: sum of d H d^T over the rows d of w - dequantized(w); no Hessian: H = I."""
    d = w.detach().cpu().float() - dequantize_entry(entry)
    weighted = d if hessian is None else d @ hessian.cpu().float()
    return float((weighted * d).sum())


def entropy_bytes(entries: list[dict]) -> float:
    """The levels' order-0 entropy in bytes: how BITS=auto scales a stream's compressed size."""
    q = torch.cat([e["q"].flatten() for e in entries]).long() + 128
    p = torch.bincount(q, minlength=256).double() / q.numel()
    return float(-(p[p > 0] * p[p > 0].log2()).sum()) * q.numel() / 8


def fit_bits(
    state: dict[str, Tensor], h: Hyperparameters, hessians: dict, budget: int, log: Logger
) -> tuple[dict, bytes, float]:
    """BITS=auto: the payload, the artifact and the compression seconds, with a bit width per stream
    group of the matrices and the embedding, fitting `budget` bytes. From the settings' widths:
    while over, the group whose error (quantization_error; relative to its squared weights without
    Hessians) grows least per byte saved loses a bit; then, while one fits, the group whose error
    falls most per byte added gains one. A group's size at another width: its last stream's, scaled
    by the levels' entropy; the chosen widths are compressed for real (lowered again if over)."""
    kinds, groups = {n: export_kind(n, t, h) for n, t in state.items()}, {}
    for n, t in state.items():
        if kinds[n].startswith("int") and ROLE_RULES[tensor_role(n, t)].export in AUTO_SETTINGS:
            groups.setdefault(stream_group(n, t), []).append(n)
    widths = {g: int(kinds[names[0]][3:]) for g, names in groups.items()}
    tried: dict[tuple, tuple] = {}  # (group, bits) -> (entries, entropy bytes, error)

    def at(g: str, bits: int) -> tuple:
        if (g, bits) not in tried:
            kind = f"int{bits}"
            entries = {n: quantize_tensor(n, state[n], kind, h, hessians.get(n)) for n in groups[g]}
            error = sum(quantization_error(state[n], entries[n], hessians.get(n)) for n in entries)
            if not any(n in hessians for n in entries):  # no calibration: relative to the weights
                error /= sum(float(state[n].float().square().sum()) for n in entries) or 1.0
            tried[g, bits] = entries, entropy_bytes(list(entries.values())), error
        return tried[g, bits]

    grouped = {n for names in groups.values() for n in names}
    ungrouped = [(n, t) for n, t in state.items() if n not in grouped]
    entries = {n: quantize_tensor(n, t, kinds[n], h, hessians.get(n)) for n, t in ungrouped}
    last: dict = {}  # the last artifact compressed: its length, and (bits, bytes) of each group

    def size(g: str, bits: int) -> float:  # levels all zero (a zero-initialized group) stay so
        b0, n0 = last["groups"][g]
        return n0 * at(g, bits)[1] / at(g, b0)[1] if at(g, b0)[1] else n0

    def change(g: str, bits: int) -> tuple[float, float]:  # (bytes, error) of going to bits
        return size(g, bits) - size(g, widths[g]), at(g, bits)[2] - at(g, widths[g])[2]

    def total() -> float:
        return last["length"] + sum(size(g, widths[g]) - last["groups"][g][1] for g in groups)

    def step(options: list[str], by: int) -> None:
        """Move the best group of `options` by `by` (one bit), as fit_bits' docstring says."""
        rate = {g: change(g, widths[g] + by) for g in options}
        g = min(options, key=lambda g: rate[g][1] / max(abs(rate[g][0]), 1.0))
        log(f"bits_auto group:{g} bits:{widths[g]}->{widths[g] + by} "
            f"bytes:{rate[g][0]:+.0f} error:{rate[g][1]:+.4g}")  # fmt: skip
        widths[g] += by

    cache, compress_s, first = {}, 0.0, True
    while True:  # after the first artifact, each one over the budget lowers a width: it ends
        for g in groups:
            entries |= at(g, widths[g])[0]
        payload, t0 = make_payload(entries, state, h), time.perf_counter()
        blob = artifact_bytes(payload, h.zstd_level, h.compressor, cache)
        compress_s += time.perf_counter() - t0
        if len(blob) <= budget and not first:
            break
        levels = list(level_groups(payload["tensors"]))  # their streams follow the header
        sizes = [n for _, n in stream_table(blob[len(ARTIFACT_MAGIC) :])[1 : 1 + len(levels)]]
        pairs = zip(levels, sizes, strict=True)
        last.update(length=len(blob), groups={g: (widths[g], n) for g, n in pairs if g in groups})
        before = dict(widths)
        while total() > budget:
            if not (lower := [g for g in groups if widths[g] > AUTO_BITS[0]]):
                raise BrokenModel(
                    f"BITS=auto: the artifact is {total() - budget:.0f} bytes over the budget even "
                    f"with every group at {AUTO_BITS[0]} bits; shrink the model (NUM_LAYERS, "
                    "MODEL_DIM, MLP_MULT, VOCAB_SIZE)"
                )
            step(lower, -1)
        while first:
            up = [g for g in groups if widths[g] < AUTO_BITS[-1]]
            if not (up := [g for g in up if total() + change(g, widths[g] + 1)[0] <= budget]):
                break
            step(up, +1)
        if widths == before:
            break
        first = False
    chosen = " ".join(f"{g}:{bits}" for g, bits in widths.items())
    log(f"bits_auto widths {chosen} bytes:{len(blob)} budget:{budget}")
    return payload, blob, compress_s


# ===== Evaluation: every validation target scored exactly once ====================================


def window_stride(stride: int, window: int) -> int:
    """How far each evaluation window ends after the previous one: EVAL_STRIDE, or the whole
    window (non-overlapping, plain evaluation) when it is 0 or at least the window."""
    return stride if 0 < stride < window else window


def plan_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """Windows (start, scored): targets [start, start+w) go in, the last `scored` are scored; w =
    min(seq_len, num_targets). The first window scores all its targets; each later one ends
    `window_stride(stride, w)` further (the last at the end), scoring only targets no earlier one
    scored: each is scored once, after at least min(position, w - stride) tokens of context."""
    if num_targets <= 0:
        return []
    w = min(seq_len, num_targets)
    stride = window_stride(stride, w)
    windows, scored_end = [(0, w)], w
    while scored_end < num_targets:
        end = min(scored_end + stride, num_targets)
        windows.append((end - w, end - scored_end))
        scored_end = end
    return windows


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    scored_tokens: int
    scored_bytes: int
    eval_time_ms: float
    graphs: int = 0  # graphs torch.compile built during this evaluation
    compile_ms: float = 0.0


def compile_stats() -> tuple[int, float]:
    """(graphs built, seconds spent compiling) so far in this process, from dynamo's counters."""
    from torch._dynamo import utils

    compile_s = sum(utils.compilation_time_metrics.get("_compile.compile_inner", []))
    return int(utils.counters["stats"]["unique_graphs"]), float(compile_s)


class EvalClock:
    """Times one evaluation, and counts the graphs it compiled."""

    def __init__(self):
        self.t0, (self.graphs0, self.compile0) = time.perf_counter(), compile_stats()

    def result(self, loss_sum: float, count: float, byte_count: float) -> EvalResult:
        """Mean loss (nats) and bits per byte from the sums over the scored targets."""
        graphs, compile_s = compile_stats()
        val_loss, elapsed_ms = loss_sum / count, 1000.0 * (time.perf_counter() - self.t0)
        val_bpb = val_loss / math.log(2.0) * count / byte_count
        cost = dict(eval_time_ms=elapsed_ms, graphs=graphs - self.graphs0)
        cost["compile_ms"] = 1000.0 * (compile_s - self.compile0)
        scored = dict(scored_tokens=int(count), scored_bytes=int(byte_count))
        return EvalResult(val_loss=val_loss, val_bpb=val_bpb, **scored, **cost)


def window_batch(tokens: Tensor, batch: list, batch_seqs: int, w: int, n: int) -> tuple:
    """Exactly batch_seqs windows (start, scored), a short batch padded with windows scoring
    nothing: inputs (B, w), the targets of the last n positions (B, n), the mask of those scored."""
    batch = batch + [(0, 0)] * (batch_seqs - len(batch))
    starts = torch.tensor([start for start, _ in batch], device=tokens.device)
    scored = torch.tensor([k for _, k in batch], device=tokens.device)
    seqs = tokens[starts[:, None] + torch.arange(w + 1, device=tokens.device)].long()  # (B, w + 1)
    mask = torch.arange(n, device=tokens.device)[None, :] >= (n - scored)[:, None]  # (B, n)
    return seqs[:, :-1], seqs[:, w - n + 1 :], mask


def rank_share(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous part of a list split across ranks."""
    return items[len(items) * rank // world_size : len(items) * (rank + 1) // world_size]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: Tensor,
    luts: ByteLuts,
    *,
    seq_len: int,
    stride: int,
    batch_seqs: int,
    rank: int = 0,
    world_size: int = 1,
    autocast=None,
    windows: list[tuple[int, int]] | None = None,
) -> EvalResult:
    """Mean cross-entropy (nats) and bits per byte over all targets of `tokens` (1-D, on the
    device), or over those of `windows`, a part of plan_windows(tokens.numel() - 1, seq_len,
    stride). Always in eval mode (no fake-quant; the model's mode is restored). The windows are
    split into contiguous ranges per rank and run in batches of exactly `batch_seqs` windows, each
    scoring the last `s` positions (s = the stride; the split's first window alone scores all w): a
    short batch is padded (window_batch), and positions a window does not score (padding, the last
    window's overlap with the one before) are masked out of the sums. So the model sees at most two
    shapes, and a compiled one builds at most two graphs."""
    clock, autocast = EvalClock(), autocast or contextlib.nullcontext
    windows = plan_windows(tokens.numel() - 1, seq_len, stride) if windows is None else windows
    mine = rank_share(windows, rank, world_size)
    w = min(seq_len, tokens.numel() - 1)
    s = window_stride(stride, w)
    batch_seqs = max(batch_seqs, 1)
    sums = torch.zeros(3, device=tokens.device, dtype=torch.float64)  # loss, targets, bytes
    was_training = model.training
    model.eval()
    try:
        for n, group in ((w, [m for m in mine if m[1] > s]), (s, [m for m in mine if m[1] <= s])):
            for b in range(0, len(group), batch_seqs):
                x, y, mask = window_batch(tokens, group[b : b + batch_seqs], batch_seqs, w, n)
                with autocast():
                    losses = model(x, y, score_last=n, reduction="none")
                sums[0] += torch.where(mask, losses.double(), 0.0).sum()
                sums[1] += mask.sum()
                sums[2] += torch.where(mask, luts.count(x[:, w - n :], y), 0).sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return clock.result(*sums.tolist())


def evaluate_ttt(
    model, tokens, luts, h, *, seq_len, stride, batch_seqs, rank=0, world_size=1, autocast=None
) -> EvalResult:
    """Score-first test-time training over evaluate()'s windows, in chunks of about TTT_CHUNK_TOKENS
    targets: each chunk is scored, then TTT_EPOCHS SGD steps train the model on exactly the targets
    just scored; the last chunk is only scored. So every target is scored once, by a model trained
    only on targets scored before it. A window belongs to the chunk of its last target. The chunk's
    targets [lo, hi) are cut into windows of w targets (the last one a full window ending at hi, its
    earlier targets masked), split across ranks and run in padded micro-batches of one shape. Each
    step's gradient is the mean over the whole chunk (each rank's loss sum over the chunk's target
    count, summed across ranks): the same update on every rank, for any number of ranks. The model
    stays in eval mode (no fake-quant). Arguments: evaluate()'s and the settings."""
    clock, autocast = EvalClock(), autocast or contextlib.nullcontext
    w = min(seq_len, tokens.numel() - 1)
    by_chunk: dict[int, list] = {}
    for start, scored in plan_windows(tokens.numel() - 1, seq_len, stride):
        by_chunk.setdefault((start + w - 1) // h.ttt_chunk_tokens, []).append((start, scored))
    chunks = list(by_chunk.values())
    spans = [(c[0][0] + w - c[0][1], c[-1][0] + w) for c in chunks]  # targets [lo, hi) scored
    # One scoring and one training batch shape for the whole pass, no larger than needed.
    most_windows = max(map(len, chunks))
    most_seqs = max([-(-(hi - lo) // w) for lo, hi in spans[:-1]], default=0)  # to train on
    score_batch = max(1, min(batch_seqs, -(-most_windows // world_size)))
    micro = max(1, min(batch_seqs, -(-most_seqs // world_size)))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    model.eval()
    sums = [0.0, 0, 0]  # loss, targets, bytes
    ranks = dict(rank=rank, world_size=world_size, autocast=autocast)
    for c, (windows, (lo, hi)) in enumerate(zip(chunks, spans, strict=True)):
        plan = dict(seq_len=seq_len, stride=stride, batch_seqs=score_batch, windows=windows)
        r = evaluate(model, tokens, luts, **plan, **ranks)
        scored = (r.val_loss * r.scored_tokens, r.scored_tokens, r.scored_bytes)
        sums = [total + more for total, more in zip(sums, scored, strict=True)]
        if c == len(chunks) - 1:
            break  # nothing is scored after the last chunk: training on it would change no score
        # (start, scored) windows of w targets over [lo, hi), the last one ending at hi
        seqs = [(min(a + w, hi) - w, min(a + w, hi) - a) for a in range(lo, hi, w)]
        mine = rank_share(seqs, rank, world_size)
        cosine = 0.5 * (1.0 + math.cos(math.pi * c / (len(chunks) - 1)))
        opt.param_groups[0]["lr"] = h.ttt_lr * cosine
        for _ in range(h.ttt_epochs):
            opt.zero_grad(set_to_none=True)
            for b in range(0, -(-len(seqs) // world_size), micro):  # as many on every rank
                x, y, mask = window_batch(tokens, mine[b : b + micro], micro, w, w)
                with torch.enable_grad():
                    with autocast():
                        losses = model(x, y, score_last=w, reduction="none")  # (micro, w)
                    (torch.where(mask, losses, 0.0).sum() / (hi - lo)).backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            if world_size > 1:
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                grads = flat.split([p.numel() for p in params])
            for p, g in zip(params, grads, strict=True):
                p.grad = g.view_as(p)
            if h.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
            opt.step()
    return clock.result(*sums)


def projected_fineweb_eval_seconds(scored_tokens_per_s: float, world_size: int) -> float:
    """How long the whole published split would take on 8 devices at this run's rate per device."""
    return FINEWEB_VAL_TOKENS / (scored_tokens_per_s / world_size * 8)


def log_eval_projection(log, rate: float, world_size: int, what="", remedy="raise EVAL_STRIDE"):
    """The evaluation's time on the published split on 8 such devices, warned over the budget."""
    projected_s = projected_fineweb_eval_seconds(rate, world_size)
    log(f"projected_fineweb_8gpu{what}:{projected_s:.1f}s")
    if projected_s > EVAL_BUDGET_SECONDS:
        log(
            f"WARNING: at this rate the full {FINEWEB_VAL_TOKENS}-token split would take "
            f"{projected_s:.0f}s on 8 such devices, over the {EVAL_BUDGET_SECONDS:.0f}s "
            f"evaluation budget; {remedy}"
        )


# ===== Training ===================================================================================


class NonFiniteLoss(RuntimeError):
    pass


class BrokenModel(RuntimeError):
    """The model cannot be a result: a non-finite score or weight, or a value fp16 cannot hold."""


RUN_ERRORS = (ValueError, OSError, NonFiniteLoss, BrokenModel)  # no traceback: the line says it


@dataclass
class TrainState:
    """Where training stands: what a resume restores besides weights and optimizer state."""

    step: int = 0
    train_time_ms: float = 0.0
    loader_position: tuple = (0, 0)  # (shard index, token offset) of the shared stream
    val_history: list = field(default_factory=list)
    started: bool = False  # the first real step has begun (the warm-up is undone, not counted)
    finished: bool = False  # training is over and its weights are kept
    clock: Callable | None = None  # while training: the training time so far, in ms


@dataclass
class Session:
    """What the phases of a run share: settings, processes, files, log, data and the model."""

    h: Hyperparameters
    rt: Runtime
    files: RunFiles
    log: Logger
    state: TrainState
    grad_accum_steps: int
    bos_id: int
    val_tokens: Tensor  # on the device
    luts: ByteLuts  # on the device
    base_model: GPT
    compile_fn: Callable  # torch.compile with the run's options, or the identity
    compiled: nn.Module  # base_model compiled: what evaluations call
    model: nn.Module  # what training calls: compiled, in DDP when distributed
    optimizers: list
    ema: EMA | None

    def loader(self) -> DistributedTokenLoader:
        """The training data from where the state says training stands."""
        rt, position = self.rt, tuple(self.state.loader_position)
        at = (train_shards(self.h), rt.rank, rt.world_size, rt.device, self.h.vocab_size, position)
        return DistributedTokenLoader(*at)

    def score(self, model: nn.Module, final: bool = False, method=evaluate) -> EvalResult:
        """The validation split scored on plain windows of TRAIN_SEQ_LEN, or (final) on the final
        evaluation's windows (EVAL_SEQ_LEN, EVAL_STRIDE)."""
        h, rt = self.h, self.rt
        seq_len = h.effective_eval_seq_len if final else h.train_seq_len
        per_rank = h.val_batch_size // (rt.world_size * self.grad_accum_steps * seq_len)
        batch_seqs = h.eval_batch_seqs or max(1, per_rank)  # VAL_BATCH_SIZE split as in training
        rt.sync()
        ranks = dict(rank=rt.rank, world_size=rt.world_size, autocast=rt.autocast)
        plan = dict(seq_len=seq_len, stride=h.final_stride if final else 0, batch_seqs=batch_seqs)
        return method(model, self.val_tokens, self.luts, **plan, **ranks)

    def record_validation(self, step: int, result: EvalResult) -> None:
        state = self.state
        entry = {"step": step, "train_time_ms": round(state.train_time_ms, 1)}
        state.val_history.append(entry | {"val_loss": result.val_loss, "val_bpb": result.val_bpb})
        self.log(
            f"step:{step}/{self.h.iterations} val_loss:{result.val_loss:.4f} "
            f"val_bpb:{result.val_bpb:.4f} train_time:{state.train_time_ms:.0f}ms "
            f"step_avg:{state.train_time_ms / max(step, 1):.2f}ms"
        )


def training_cap_ms(h: Hyperparameters) -> float | None:
    """The wall-clock cap of the training loop; GPTQ's calibration is training time and keeps
    GPTQ_RESERVE_SECONDS of it."""
    if h.max_wallclock_seconds <= 0:
        return None
    reserve_s = h.gptq_reserve_seconds if h.quant_method == "gptq" else 0.0
    return 1000.0 * (h.max_wallclock_seconds - reserve_s)


def schedule(h: Hyperparameters, step: int, elapsed_ms: float) -> tuple[float, float]:
    """(LR scale, Muon momentum) of a step."""
    length = dict(iterations=h.iterations, max_wallclock_ms=training_cap_ms(h))
    warmdown = dict(warmdown_iters=h.warmdown_iters, warmdown_frac=h.warmdown_frac, min_lr=h.min_lr)
    warmup = dict(start=h.muon_momentum_warmup_start, warmup_steps=h.muon_momentum_warmup_steps)
    lr_scale = lr_multiplier(step, elapsed_ms, **length, **warmdown)
    if h.warmdown_shape == "clamped":  # the record's: the line toward 0, floored at MIN_LR
        line = lr_multiplier(step, elapsed_ms, **length, **warmdown | {"min_lr": 0.0})
        lr_scale = max(line, h.min_lr)
    return lr_scale, muon_momentum_at(step, end=h.muon_momentum, **warmup)


def check_finite(first_bad_step: Tensor, rt: Runtime) -> None:
    """Raise on every rank if any saw a non-finite loss (first_bad_step >= 0); syncs the host."""
    bad = torch.where(first_bad_step < 0, torch.iinfo(torch.int64).max, first_bad_step)
    if rt.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if bad.item() != torch.iinfo(torch.int64).max:
        raise NonFiniteLoss(
            f"non-finite training loss at step {bad.item() + 1}; lower the learning rates or "
            "GRAD_CLIP_NORM, or check the data"
        )


def train_step(s: Session, loader, lr_scale: float, momentum: float) -> Tensor:
    """One optimizer step (all micro-steps); returns the mean training loss as a device tensor
    (no sync). Reads the session's model, optimizers, settings, runtime and micro-steps."""
    model, h, rt, grad_accum_steps = s.model, s.h, s.rt, s.grad_accum_steps
    local_tokens = h.train_batch_tokens // (rt.world_size * grad_accum_steps)
    total = torch.zeros((), device=rt.device)
    for micro in range(grad_accum_steps):
        x, y = loader.next_batch(local_tokens, h.train_seq_len)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro == grad_accum_steps - 1
        with rt.autocast():
            loss = model(x, y, packed=True)
        (loss / grad_accum_steps).backward()
        total += loss.detach()
    if h.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
    for opt in s.optimizers:  # each reads only its own parameters' gradients
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        if isinstance(opt, Muon):
            opt.param_groups[0]["momentum"] = momentum
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / grad_accum_steps


def warm_up(s: Session) -> None:
    """Prime compilation and the allocator on real steps (both layer orders with loops), then
    restore weights, optimizer state and data position: training starts exactly as without them."""
    h, base_model = s.h, s.base_model
    model_state = copy.deepcopy(base_model.state_dict())
    opt_states = [copy.deepcopy(opt.state_dict()) for opt in s.optimizers]
    t_warm, loader = time.perf_counter(), s.loader()
    lr_scale, momentum = schedule(h, s.state.step, s.state.train_time_ms)
    for i in range(h.warmup_steps):
        base_model.looping = h.num_loops > 0 and 2 * i >= h.warmup_steps
        train_step(s, loader, lr_scale, momentum)
    base_model.looping = False
    s.rt.sync()
    base_model.load_state_dict(model_state)
    for opt, opt_state in zip(s.optimizers, opt_states, strict=True):
        opt.load_state_dict(opt_state)
    warm_ms = 1000 * (time.perf_counter() - t_warm)
    s.log(f"warmup_steps:{h.warmup_steps} warmup_time:{warm_ms:.0f}ms (undone)")


def log_train_loss(s: Session, loss: Tensor, approx_ms: float, flops_per_step: float) -> None:
    """The mean training loss over the ranks (logging steps may sync the host; others never)."""
    h, rt, step = s.h, s.rt, s.state.step
    loss_value = loss.detach().clone()
    if rt.distributed:
        dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
        loss_value /= rt.world_size
    seconds = max(approx_ms / 1000.0, 1e-9)
    tok_s = h.train_batch_tokens * step / seconds
    peak = (device_peak_flops(rt.device) or 0.0) * rt.world_size
    mfu = f" mfu:{100 * flops_per_step * step / seconds / peak:.1f}%" if peak else ""
    s.log(
        f"step:{step}/{h.iterations} train_loss:{loss_value.item():.4f} "
        f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms tok_s:{tok_s:.0f}{mfu}"
    )


def train(s: Session, signals: StopSignals) -> None:
    """Train from s.state to ITERATIONS or the wall-clock cap, keeping s.state up to date."""
    h, rt, state, base_model, log = s.h, s.rt, s.state, s.base_model, s.log
    if h.warmup_steps > 0 and h.iterations > state.step:
        warm_up(s)
    loader, cap_ms = s.loader(), training_cap_ms(h)
    flops_per_step = model_flops_per_token(h, base_model) * h.train_batch_tokens
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=rt.device)
    start_step, stop_after_step = state.step, None
    late_qat = h.qat and h.late_qat_threshold > 0  # off until the LR scale drops below it
    base_model.set_qat_active(not late_qat)
    rt.sync()
    t0 = last_checkpoint = time.perf_counter()

    def clock_ms() -> float:
        return state.train_time_ms + 1000.0 * (time.perf_counter() - t0)

    def loops_due(ms: float) -> bool:
        progress = ms / cap_ms if cap_ms else state.step / max(h.iterations, 1)
        return h.num_loops > 0 and progress >= h.enable_looping_at

    state.started, state.clock = True, clock_ms
    loop_now = loops_due(state.train_time_ms)  # a resumed run may be past the switch
    while True:
        step = state.step
        if loop_now and not base_model.looping:  # the step time before and after prices the loops
            base_model.looping = True
            virtual = sum(base_model.layer_order[True], [])
            log(
                f"looping_on step:{step} train_time:{clock_ms():.0f}ms virtual_layers:{virtual} "
                f"graphs:{compile_stats()[0]}"
            )
        if step >= h.iterations or (stop_after_step is not None and step >= stop_after_step):
            rt.sync()
            state.train_time_ms = clock_ms()
            if step < h.iterations:
                log(
                    f"stopping_early: wallclock_cap train_time:{state.train_time_ms:.0f}ms "
                    f"step:{step}/{h.iterations}"
                )
            break
        validate_now = h.val_loss_every > 0 and step % h.val_loss_every == 0
        if validate_now and (step > start_step or step == 0):
            rt.sync()
            state.train_time_ms = clock_ms()
            result = s.score(s.compiled)
            if not math.isfinite(result.val_loss):
                raise BrokenModel(f"validation loss is {result.val_loss} at step {step}")
            s.record_validation(step, result)
            rt.sync()
            t0 = time.perf_counter()
        lr_scale, momentum = schedule(h, step, clock_ms())
        if late_qat and lr_scale < h.late_qat_threshold:
            late_qat = False
            base_model.set_qat_active(True)
            log(f"late_qat_on step:{step} lr_scale:{lr_scale:.4f}")
        loss = train_step(s, loader, lr_scale, momentum)
        if s.ema is not None:
            s.ema.update()
        bad = (first_bad_step < 0) & ~torch.isfinite(loss)
        first_bad_step = torch.where(bad, step, first_bad_step)
        state.step, state.loader_position = step + 1, loader.position
        approx_ms = clock_ms()
        log_every = h.train_log_every > 0 and state.step % h.train_log_every == 0
        if state.step <= 5 or log_every or state.step == h.iterations:
            check_finite(first_bad_step, rt)
            log_train_loss(s, loss, approx_ms, flops_per_step)
        # One host-side agreement per step: the cap, a stop signal on any rank, a checkpoint, loops.
        since_checkpoint = time.perf_counter() - last_checkpoint
        checkpoint_due = 0 < h.checkpoint_every_seconds <= since_checkpoint
        at_cap = cap_ms is not None and approx_ms >= cap_ms
        flags = (at_cap, signals.signum, checkpoint_due, loops_due(approx_ms))
        reached_cap, stop, checkpoint_now, loop_now = rt.agree(*map(int, flags))
        if stop:
            state.train_time_ms = clock_ms()
            raise StopRequested(stop)
        if checkpoint_now:
            state.train_time_ms, t_ckpt = clock_ms(), time.perf_counter()
            write_checkpoint(s)
            ckpt_ms = 1000 * (time.perf_counter() - t_ckpt)
            log(
                f"checkpoint:{s.files.checkpoint} step:{state.step} time:{ckpt_ms:.0f}ms "
                "(not counted as training)"
            )
            t0 = last_checkpoint = time.perf_counter()
        if stop_after_step is None and reached_cap:
            stop_after_step = state.step
    check_finite(first_bad_step, rt)


# ===== Run management: processes, devices, logging, signals, files, checkpoints, preflight =======


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    use_compile: bool
    host_group: object  # for host-side agreement (run id, stop decision); None = device group
    attention: str = "math"  # the SDPA backend in use
    notes: list = field(default_factory=list)  # lines for the log once it exists (fallbacks)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def host_sync(self) -> str:
        return "device" if self.distributed and self.host_group is None else "gloo"

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def agree(self, *flags: int) -> list[int]:
        """Element-wise max of small ints over all ranks: host-only via gloo, else a device trip."""
        if not self.distributed:
            return list(flags)
        device = "cpu" if self.host_group is not None else self.device
        t = torch.tensor(flags, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.host_group)


def select_attention_backend(h: Hyperparameters, device: torch.device) -> str:
    """Enable exactly one SDPA backend on CUDA, tried on this model's GQA head shape; CPU: math."""
    if device.type != "cuda":
        return "math"
    head_dim = h.model_dim // h.num_heads
    q = torch.randn(1, h.num_heads, 16, head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, h.num_kv_heads, 16, head_dim, device=device, dtype=torch.bfloat16)
    errors = []
    for name in SDPA_BACKENDS if h.sdpa_backend == "auto" else (h.sdpa_backend,):
        for other in SDPA_BACKENDS:
            flag = "mem_efficient" if other == "efficient" else other
            getattr(torch.backends.cuda, f"enable_{flag}_sdp")(other == name)
        try:
            gqa = h.num_kv_heads != h.num_heads
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=gqa)
            return name
        except RuntimeError as e:
            errors.append(f"{name}: {str(e).splitlines()[0]}")
    raise ValueError(
        f"SDPA_BACKEND={h.sdpa_backend}: no attention backend runs this model here "
        f"({'; '.join(errors)}); try another SDPA_BACKEND ({', '.join(SDPA_BACKENDS)})"
    )


def init_runtime(h: Hyperparameters, env) -> Runtime:
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    if "LOCAL_RANK" in env and sys.platform == "linux":  # a killed launcher SIGTERMs its ranks
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    want = h.device if h.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE=cuda but no CUDA device is available; use DEVICE=cpu or auto")
    device = torch.device("cuda", local_rank) if want == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_compile = h.compile == "1" or (h.compile == "auto" and device.type == "cuda")
    attention = select_attention_backend(h, device)
    rt = Runtime(rank, local_rank, world_size, device, use_compile, None, attention)
    if world_size > 1:
        timeout = datetime.timedelta(seconds=h.collective_timeout_seconds)  # a dead or frozen peer
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        dist.init_process_group(backend=backend, device_id=device_id, timeout=timeout)
        if device.type == "cpu" and h.host_sync != "gloo":
            rt.host_group = dist.group.WORLD  # already gloo
        elif h.host_sync != "device":
            try:  # a gloo group beside NCCL keeps the per-step agreement off the device
                rt.host_group = dist.new_group(backend="gloo", timeout=timeout)
                dist.barrier(group=rt.host_group)
            except Exception as e:
                rt.host_group = None
                rt.notes.append(
                    f"warning: host_sync gloo group failed ({type(e).__name__}: {e}); host-side "
                    "agreement falls back to device all-reduces (HOST_SYNC=device)"
                )
    return rt


class Logger:
    """Rank 0 writes, each line appended and closed at once: a crash leaves the log as it stands."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.open("xb").close()
            except FileExistsError:
                raise ValueError(f"{path} exists: another run has this RUN_ID") from None

    def __call__(self, msg: str, console: bool = True, data: bytes | None = None) -> None:
        if self.path is not None:
            if console:
                print(msg, flush=True)
            with open(self.path, "ab") as f:
                f.write((msg + "\n").encode("utf-8") if data is None else data)

    def write_code(self, code: bytes, name: str) -> None:
        sha256 = hashlib.sha256(code).hexdigest()
        header = f"code_begin path:{name} bytes:{len(code)} sha256:{sha256}\n"
        self(header, console=False, data=header.encode() + code + b"\ncode_end\n")


BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12,
                   "A10G": 70e12}  # fmt: skip


def device_peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def versions() -> str:
    parts = [f"python:{platform.python_version()}"]
    parts += [f"{m.__name__}:{m.__version__}" for m in (torch, np, spm, zstandard, brotli)]
    if torch.cuda.is_available():
        parts += [f"cuda:{torch.version.cuda}", f"gpu:{torch.cuda.get_device_name()}"]
    return " ".join(parts)


class StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """While active, SIGINT/SIGTERM record themselves, and training stops at the next step
    boundary; once `raise_now` is set (training is over), they stop the run where it is."""

    def __enter__(self) -> StopSignals:
        self.signum, self.raise_now = 0, False
        self.previous = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.raise_now:
            raise StopRequested(signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunFiles:
    """Every file a run writes; none may exist before it starts, so nothing is overwritten."""

    run_id: str
    log: Path
    summary: Path
    raw: Path  # the trained weights, written before anything can fail
    artifact: Path
    checkpoint: Path  # resume checkpoints (CHECKPOINT_EVERY_SECONDS, or a stop signal)
    claim: Path  # exists while the run lives: two runs with one RUN_ID cannot both start

    @classmethod
    def of(cls, h: Hyperparameters, run_id: str) -> RunFiles:
        logs, arts = Path(h.log_dir), Path(h.artifact_dir)
        names = (logs / f"{run_id}.txt", logs / f"{run_id}.json", arts / f"{run_id}_raw.pt")
        ends = (arts / f"{run_id}.int6.ptz", arts / f"{run_id}_ckpt.pt", arts / f"{run_id}.claim")
        return cls(run_id, *names, *ends)

    def claim_run_id(self) -> None:
        """Create the claim exclusively (rank 0): of two runs started with one RUN_ID and one
        ARTIFACT_DIR, the second stops here, before it writes anything."""
        try:
            self.claim.open("x").close()
        except FileExistsError:
            held = f"{self.claim} exists, another run holds this RUN_ID"
            raise ValueError(f"RUN_ID={self.run_id}: {held} (a killed one: delete it)") from None

    def taken(self) -> Path | None:
        paths = (self.log, self.summary, self.raw, self.artifact, self.checkpoint)
        return next((p for p in paths if p.exists()), None)


CHECKPOINT_FORMAT = "pgolf-checkpoint"  # resume checkpoints; raw checkpoints are a bare state dict
RESUME_KEYS = ("model", "optimizers", "step", "train_time_ms", "loader_position", "val_history",
               "rng", "world_size", "ema", "hyperparameters")  # fmt: skip


def write_checkpoint(s: Session) -> None:
    """A resume checkpoint (collective): weights, all optimizer state, position, clock and RNG."""
    rt, state = s.rt, s.state
    opt_states = [opt.state_dict() for opt in s.optimizers]
    if rt.distributed:  # Muon keeps each matrix's momentum only on the rank that orthogonalizes it
        mine = [
            {k: {n: t.cpu() for n, t in v.items()} for k, v in o["state"].items()}
            for o in opt_states
        ]
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, mine, group=rt.host_group)
        for i, o in enumerate(opt_states):
            o["state"] = {k: v for shard in everyone for k, v in shard[i].items()}
    if rt.master:
        atomic_write_bytes(s.files.checkpoint, torch_save_bytes({
            "format": CHECKPOINT_FORMAT, "model": s.base_model.state_dict(),
            "optimizers": opt_states, "step": state.step, "train_time_ms": state.train_time_ms,
            "loader_position": list(state.loader_position), "val_history": state.val_history,
            "rng": torch.get_rng_state(), "world_size": rt.world_size,
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "hyperparameters": {k: str(v) for k, v in s.h.as_env().items()},
        }))  # fmt: skip
    rt.barrier()


def restore_checkpoint(s: Session, ckpt: dict) -> None:
    """Continue a stopped run: weights, optimizer state, EMA, RNG, step, clock and data position."""
    s.base_model.load_state_dict(ckpt["model"], strict=True)
    if len(ckpt["optimizers"]) != len(s.optimizers):
        raise ValueError(
            f"RESUME_FROM={s.h.resume_from} holds {len(ckpt['optimizers'])} optimizer states, "
            f"this run has {len(s.optimizers)} optimizers (TIE_EMBEDDINGS differs?)"
        )
    for opt, opt_state in zip(s.optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(opt_state)
    if s.ema is not None:
        s.ema.load(ckpt["ema"] or ckpt["model"])
    torch.set_rng_state(ckpt["rng"])
    state = s.state
    state.step, state.train_time_ms = ckpt["step"], ckpt["train_time_ms"]
    state.loader_position, state.val_history = tuple(ckpt["loader_position"]), ckpt["val_history"]
    settings = {k: str(v) for k, v in s.h.as_env().items() if k not in ("RUN_ID", "RESUME_FROM")}
    changed = [k for k, v in settings.items() if ckpt["hyperparameters"].get(k) != v]
    if ckpt["world_size"] != s.rt.world_size:  # other batches per rank: other results
        changed.append(f"WORLD_SIZE ({ckpt['world_size']} then, {s.rt.world_size} now)")
    warning = f" warning: settings differ from the checkpoint's: {', '.join(changed)}"
    at = f"resumed_from:{s.h.resume_from} step:{state.step} train_time:{state.train_time_ms:.0f}ms"
    s.log(at + (warning if changed else ""))


def keep_weights(s: Session) -> None:
    """Rank 0 writes the raw weights, those the artifact is made from (the EMA's when on). Where
    ARTIFACT_DIR cannot take them (a full disk), they go to LOG_DIR, and the run fails naming it."""
    if s.rt.master:
        data = torch_save_bytes((s.base_model if s.ema is None else s.ema).state_dict())
        try:
            atomic_write_bytes(s.files.raw, data)
        except OSError as e:
            fallback = Path(s.h.log_dir) / f"{s.files.run_id}_raw.{uuid.uuid4().hex[:6]}.pt"
            atomic_write_bytes(fallback, data)  # if this fails too, its error ends the run
            cause = f"{s.files.raw} could not be written ({e.strerror or e})"
            raise OSError(f"{cause}; the raw weights are in {fallback}") from None


SAME = "(other settings as this run)"  # what a re-export or a resume keeps


def save_stopped_run(s: Session, e: BaseException) -> None:
    """Training ended early: rank 0 keeps the weights; a stop signal (every rank alive) also gets
    a resume checkpoint. A failure while saving is logged and does not hide the original error."""
    files, log = s.files, s.log
    try:
        if isinstance(e, StopRequested):
            write_checkpoint(s)
        keep_weights(s)
    except Exception as save_error:
        log(f"error: could not save the weights ({type(save_error).__name__}: {save_error})")
        return
    log(
        f"interrupted step:{s.state.step}/{s.h.iterations} "
        f"train_time:{s.state.train_time_ms:.0f}ms ({e}) raw_checkpoint:{files.raw}"
    )
    log(f"to re-export: ITERATIONS=0 INIT_CHECKPOINT={files.raw} RUN_ID=<new id> {SAME}")
    if files.checkpoint.exists():
        log(f"to resume: RESUME_FROM={files.checkpoint} RUN_ID=<new id> {SAME}")


@dataclass
class Inputs:
    """What the preflight read: the run starts only once all of it is known to be good."""

    grad_accum_steps: int
    sp: spm.SentencePieceProcessor
    val_tokens: Tensor
    init_weights: dict | None = None
    init_kind: str = ""
    resume: dict | None = None


def check_writable(folder: str, setting: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe = Path(folder) / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"{setting}={folder} is not a writable folder ({e.strerror or e}); fix its "
            f"permissions or choose another {setting}"
        ) from None


def check_shapes(state: dict, expected: dict, where: str) -> dict:
    hint = "the settings (NUM_LAYERS, MODEL_DIM, MLP_MULT, VOCAB_SIZE, ...) differ from its run's"
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{where}: no tensor {name} (shape {tuple(shape)} here); {hint}")
        if state[name].shape != shape:
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(state[name].shape)} in the file, "
                f"{tuple(shape)} in this model; {hint}"
            )
        if not state[name].is_floating_point():  # loading would cast it without a word
            raise ValueError(f"{where}: tensor {name} is {state[name].dtype}, not weights")
    if extra := sorted(set(state) - set(expected)):
        raise ValueError(f"{where}: tensor {extra[0]} is not in this model; {hint}")
    return state


def read_weights(path: str, setting: str, expected: dict) -> tuple[dict, str, dict | None]:
    """(state dict, what the file is, the resume checkpoint or None) from a raw checkpoint, a
    resume checkpoint or an artifact (dequantized), shape-checked. Never runs code from the file."""
    where = f"{setting}={path}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where} does not exist")
    with open(path, "rb") as f:
        if f.read(len(ARTIFACT_MAGIC)) == ARTIFACT_MAGIC:
            state = dequantize_state_dict(read_artifact(Path(path)))
            return check_shapes(state, expected, where), "artifact (dequantized weights)", None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{where} is not a checkpoint of this script ({type(e).__name__}: {first_line})"
        ) from None
    ckpt = obj if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT else None
    if ckpt and (missing := [k for k in RESUME_KEYS if k not in ckpt]):
        raise ValueError(f"{where}: a resume checkpoint without {', '.join(missing)}; damaged?")
    state = ckpt["model"] if ckpt else obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{where} holds no weights of this script; give a raw checkpoint (*_raw.pt), a "
            "resume checkpoint (*_ckpt.pt) or an artifact (*.ptz)"
        )
    kind = "resume checkpoint" if ckpt else "raw checkpoint"
    return check_shapes(state, expected, where), kind, ckpt


def preflight(h: Hyperparameters, rt: Runtime, files: RunFiles) -> Inputs:
    """Every check that needs no device, on every rank, before the run writes anything."""
    check_writable(h.log_dir, "LOG_DIR")
    check_writable(h.artifact_dir, "ARTIFACT_DIR")
    if taken := files.taken():
        raise ValueError(
            f"RUN_ID={files.run_id}: {taken} already exists; pick another (nothing is overwritten)"
        )
    grad_accum_steps = resolve_grad_accum_steps(h, rt.world_size)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(h).state_dict().items()}
    # ARTIFACT_DIR gets the raw weights (fp32), the artifact, maybe a resume checkpoint (4x more)
    copies = 6 if h.checkpoint_every_seconds else 2
    need = 4 * sum(math.prod(v) for v in expected.values()) * copies
    if (free := shutil.disk_usage(h.artifact_dir).free) < need:
        raise ValueError(
            f"ARTIFACT_DIR={h.artifact_dir} has {free / 2**20:.1f} MiB free, the run writes up to "
            f"{need / 2**20:.1f} MiB there; free some space or choose another ARTIFACT_DIR"
        )
    min_tokens = max(h.train_seq_len, h.effective_eval_seq_len)
    val_pattern = os.path.join(h.data_path, "fineweb_val_*.bin")
    val_tokens = load_validation_tokens(val_pattern, min_tokens, h.vocab_size)
    inputs = Inputs(grad_accum_steps, load_tokenizer(h, val_tokens), val_tokens)
    train_files = shard_files(train_shards(h))
    for path in train_files:  # their token ids are checked as each is read
        if read_shard_header(path) == 0:  # the stream would look for a token forever
            raise ValueError(f"{path}: a training shard with no tokens; remove or rebuild it")
    if h.init_checkpoint:
        weights, kind, _ = read_weights(h.init_checkpoint, "INIT_CHECKPOINT", expected)
        inputs.init_weights, inputs.init_kind = weights, kind
    if h.resume_from:
        _, kind, inputs.resume = read_weights(h.resume_from, "RESUME_FROM", expected)
        if inputs.resume is None:
            raise ValueError(
                f"RESUME_FROM={h.resume_from} is a {kind}: it holds no optimizer state or data "
                "position; give a *_ckpt.pt file, or start from its weights with INIT_CHECKPOINT"
            )
        if inputs.resume["loader_position"][0] >= len(train_files):
            raise ValueError(
                f"RESUME_FROM={h.resume_from} stopped in training shard "
                f"{inputs.resume['loader_position'][0]}, DATA_PATH={h.data_path} has fewer"
            )
    return inputs


# ===== main: the phases of a run ==================================================================


def run(h: Hyperparameters, rt: Runtime, env, code: bytes, code_name: str) -> dict | None:
    """The phases of a run, holding its RUN_ID; a failure logs its error line (and, once trained,
    how to re-export), and a failure before training frees the RUN_ID."""
    run_id = [h.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]]
    if rt.distributed:
        dist.broadcast_object_list(run_id, src=0, group=rt.host_group)
    files = RunFiles.of(h, run_id[0])
    inputs = preflight(h, rt, files)
    if rt.master:
        files.claim_run_id()
    rt.barrier()  # every rank passed before rank 0 creates the log
    state, log = TrainState(), Logger(None)
    try:
        log = Logger(files.log if rt.master else None)  # exclusive: a twin run's log is not ours
        with StopSignals() as signals:
            log.write_code(code, code_name)
            log_start(h, rt, env, files, inputs, log)
            s = start_session(h, rt, files, inputs, log, state)
            train_and_keep(s, signals)
            if not h.final_eval:
                log(f"throughput_run_complete run_id:{files.run_id} steps:{state.step} no_artifact")
                return None
            prequant = score_trained(s)
            bytes_model = export(s, len(code))
            return write_summary(s, code, bytes_model, final_evaluations(s, prequant))
    except BaseException as e:
        known = isinstance(e, (ValueError, RuntimeError, StopRequested))
        log(f"error: {e}" if known else f"error: {type(e).__name__}: {e}")
        if state.finished and rt.master:  # after training: where the weights are, and what to do
            log(f"to re-export: ITERATIONS=0 INIT_CHECKPOINT={files.raw} RUN_ID=<new id> {SAME}")
        if log.path and not state.started:  # nothing trained: free the RUN_ID, keep the log aside
            names = (f"{files.run_id}.failed{f'-{i}' if i else ''}.txt" for i in range(10**6))
            failed = next(p for p in map(files.log.with_name, names) if not p.exists())
            os.replace(files.log, failed)  # an earlier failure's log stays
            print(f"the log is kept as {failed}; RUN_ID={files.run_id} stays free", file=sys.stderr)
        raise
    finally:
        if rt.master:
            files.claim.unlink(missing_ok=True)


def log_start(h: Hyperparameters, rt: Runtime, env, files: RunFiles, inputs: Inputs, log: Logger):
    """The warnings, every setting, and what this run runs on and with."""
    for line in setting_warnings(env, h) + rt.notes:
        log(line)
    for name, value in h.as_env().items():
        log(f"setting {name}:{value}", console=False)
    log("overrides: " + " ".join(f"{k}={v}" for k, v in h.overrides().items()))
    log(
        f"run_id:{files.run_id} preset:{h.preset or 'none'} world_size:{rt.world_size} "
        f"grad_accum_steps:{inputs.grad_accum_steps} device:{rt.device} "
        f"compile:{int(rt.use_compile)} attention:{rt.attention} host_sync:{rt.host_sync} "
        f"{versions()}"
    )
    log(
        f"val_tokens:{inputs.val_tokens.numel()} tokenizer:{h.tokenizer_path} "
        f"bos_id:{inputs.sp.bos_id()} data:{h.data_path}"
    )


def start_session(
    h: Hyperparameters, rt: Runtime, files: RunFiles, inputs: Inputs, log: Logger, state: TrainState
) -> Session:
    """The model (initialized, or from INIT_CHECKPOINT), compiled and wrapped, its optimizers and
    EMA; a resumed run's state restored."""
    torch.manual_seed(h.seed)
    luts = build_byte_luts(inputs.sp, h.vocab_size).to(rt.device)
    base_model = build_model(h, rt.device, inputs.sp.bos_id())
    if inputs.init_weights is not None:
        base_model.load_state_dict(inputs.init_weights, strict=True)
        log(f"init_checkpoint:{h.init_checkpoint} kind:{inputs.init_kind}")
    for pattern in filter(None, (p.strip() for p in h.fp16_keep.split(","))):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in base_model.state_dict()):
            log(f"warning: FP16_KEEP pattern {pattern!r} names no tensor of this model")
    n_params = sum(p.numel() for p in base_model.parameters())
    log(
        f"model_params:{n_params} layers:{h.num_layers} dim:{h.model_dim} "
        f"heads:{h.num_heads}/{h.num_kv_heads} mlp_mult:{h.mlp_mult} "
        f"smear_gate:{h.smear_gate} doc_attention:{int(h.doc_attention)} qat:{int(h.qat)} "
        f"flops_per_token:{model_flops_per_token(h, base_model):.0f} "
        f"peak_flops_per_device:{device_peak_flops(rt.device) or 0:.4g}"
    )
    compile_fn, zeropower = (lambda m: m), zeropower_via_newtonschulz5
    if rt.use_compile:  # training plus the evaluations' (at most two) shapes each, with headroom
        compile_fn = functools.partial(torch.compile, dynamic=False, fullgraph=True)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        zeropower = torch.compile(zeropower_via_newtonschulz5)
    model = compiled = compile_fn(base_model)
    if rt.distributed:
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        model = DDP(compiled, device_ids=device_ids, broadcast_buffers=False)
    optimizers = build_optimizers(h, base_model, zeropower, fused=rt.device.type == "cuda")
    ema = EMA(base_model, h.ema_decay) if h.ema_decay > 0 else None
    setup = dict(h=h, rt=rt, files=files, log=log, state=state, bos_id=inputs.sp.bos_id())
    data = dict(val_tokens=inputs.val_tokens.to(rt.device), luts=luts)
    models = dict(base_model=base_model, compile_fn=compile_fn, compiled=compiled, model=model)
    training = dict(grad_accum_steps=inputs.grad_accum_steps, optimizers=optimizers, ema=ema)
    s = Session(**setup, **data, **models, **training)
    if inputs.resume is not None:
        restore_checkpoint(s, inputs.resume)
    return s


def train_and_keep(s: Session, signals: StopSignals) -> None:
    """Train, then keep the weights the artifact is made from before anything else can fail; a
    stopped or failed run keeps them too. Signals only record themselves until the weights are
    kept (a second one must not cut a write short), then stop the run where it is."""
    h, state, log = s.h, s.state, s.log
    t_train = time.perf_counter()
    try:
        train(s, signals)
    except BaseException as e:
        if state.started:
            state.train_time_ms = state.clock()  # the loop's clock, wherever it stopped
            save_stopped_run(s, e)
        raise
    keep_weights(s)
    state.finished, signals.raise_now = True, True
    if signals.signum:
        raise StopRequested(signals.signum)
    train_tokens = sum(read_shard_header(p) for p in shard_files(train_shards(h)))
    epochs = state.step * h.train_batch_tokens / max(train_tokens, 1)
    wall_ms = 1000 * (time.perf_counter() - t_train)
    log(
        f"training_done steps:{state.step} train_time:{state.train_time_ms:.0f}ms "
        f"graphs:{compile_stats()[0]} wall_time:{wall_ms:.0f}ms raw_checkpoint:{s.files.raw} "
        f"data_epochs:{epochs:.3f}"
    )
    if s.rt.device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        log(f"peak memory allocated:{allocated // 2**20}MiB reserved:{reserved // 2**20}MiB")
    else:
        log(f"peak memory rss:{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}MiB")


def log_final(log: Logger, name: str, r: EvalResult, lead="", tail="", timed=True) -> None:
    """One final_<name>_exact line: the score at full precision, and what it cost."""
    cost = f" eval_time:{r.eval_time_ms:.0f}ms graphs:{r.graphs} compile_time:{r.compile_ms:.0f}ms"
    scores = f"val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}"
    log(f"final_{name}_exact {lead}{scores}{tail}{cost if timed else ''}")


UNIFORM_MARGIN_NATS = 0.05  # a score this far above a uniform guess is a broken model, not noise


def check_score(r: EvalResult, what: str, h: Hyperparameters, remedy: str) -> EvalResult:
    """A final score that cannot be a result ends the run: not finite, or above a uniform guess
    over the vocabulary (ln VOCAB_SIZE nats) by more than UNIFORM_MARGIN_NATS."""
    uniform = math.log(h.vocab_size)
    if not r.val_loss <= uniform + UNIFORM_MARGIN_NATS:  # NaN too
        raise BrokenModel(
            f"{what} scores val_loss {r.val_loss:.4f}, worse than a uniform guess (ln "
            f"{h.vocab_size} = {uniform:.4f}): {remedy or DIVERGED}; {KEPT}"
        )
    return r


def score_trained(s: Session) -> EvalResult:
    """The weights the artifact is made from, scored before quantization (with EMA on, the raw
    trained weights are scored first)."""
    s.base_model.looping = s.h.num_loops > 0  # the final model runs its loops
    if s.ema is not None:
        log_final(s.log, "prequant_raw", s.score(s.compiled), timed=False)
        s.base_model.load_state_dict(s.ema.state_dict())
    prequant = s.score(s.compiled)
    check_exportable(s.base_model.state_dict(), s.h)  # names the weight, so first
    s.record_validation(s.state.step, check_score(prequant, "the trained model", s.h, DIVERGED))
    return prequant


def export(s: Session, bytes_code: int) -> int:
    """Quantize (GPTQ calibrated on training data, or round to nearest), compress and write the
    artifact; log its size against the limit. Returns the artifact's bytes."""
    h, rt, log, files = s.h, s.rt, s.log, s.files
    t_export, hessians = time.perf_counter(), None
    if h.quant_method == "gptq":  # calibration and quantization are training time (the reserve)
        hessians = collect_hessians(s.base_model, h, rt, s.grad_accum_steps)
        calib_ms = 1000 * (time.perf_counter() - t_export)
        log(f"gptq_calibration tokens:{h.gptq_calib_tokens} time:{calib_ms:.0f}ms")
    if rt.master:
        state = s.base_model.state_dict()
        if h.bits == "auto":  # the widths are chosen in the reserve, the compressions are not
            budget = (h.bits_budget or SIZE_LIMIT_BYTES) - bytes_code
            payload, blob, compress_s = fit_bits(state, h, hessians or {}, budget, log)
            quantized_s = time.perf_counter() - t_export - compress_s
        else:
            payload = quantize_state_dict(state, h, hessians)
            quantized_s = time.perf_counter() - t_export
            blob = artifact_bytes(payload, h.zstd_level, h.compressor)
        compress_ms = 1000 * (time.perf_counter() - t_export - quantized_s)
        if corrected := [n for n, e in payload["tensors"].items() if "lqer_a" in e]:
            log(f"lqer rank:{h.lqer_rank} tensors:{','.join(corrected)}")
        codecs = [codec for codec, _ in stream_table(blob[len(ARTIFACT_MAGIC) :])]
        chosen = " ".join(f"{c}:{codecs.count(c)}" for c in CODECS if c in codecs)
        log(f"compression:{h.compressor} streams:{len(codecs)} {chosen} time:{compress_ms:.0f}ms")
        atomic_write_bytes(files.artifact, blob)
        export_ms = 1000 * (time.perf_counter() - t_export)
        log(f"artifact:{files.artifact} export_time:{export_ms:.0f}ms")
        if hessians is not None:
            over = quantized_s > h.gptq_reserve_seconds
            log(
                f"gptq calibration+quantization:{1000 * quantized_s:.0f}ms "
                f"reserved:{1000 * h.gptq_reserve_seconds:.0f}ms"
                + (" WARNING: over the reserve, raise GPTQ_RESERVE_SECONDS" if over else "")
            )
    rt.barrier()
    bytes_model = files.artifact.stat().st_size
    bytes_total = bytes_model + bytes_code
    bits = "int6" if h.mlp_bits == h.attn_bits == 6 else f"int{h.mlp_bits}/{h.attn_bits}"
    bits = "bits-auto" if h.bits == "auto" else bits
    label = bits + (f"+zstd-{h.zstd_level}" if h.compressor == "zstd" else f"+{h.compressor}")
    log(f"Serialized model {label}: {bytes_model} bytes")
    log(f"Code size: {bytes_code} bytes")
    log(f"Total submission size {label}: {bytes_total} bytes")
    fits, margin = bytes_total <= SIZE_LIMIT_BYTES, SIZE_LIMIT_BYTES - bytes_total
    log(f"fits_16mb:{str(fits).lower()} margin:{margin}")
    if not fits:
        log(
            f"WARNING: the submission is {-margin} bytes OVER the {SIZE_LIMIT_BYTES}-byte limit; "
            "shrink the model or change the quantization settings (BITS=auto fits it)"
        )
    return bytes_model


def final_evaluations(s: Session, prequant: EvalResult) -> dict[str, EvalResult | None]:
    """The artifact read back from disk into a fresh model and scored: plain windows (the round
    trip), the sliding windows when they differ, then test-time training when on."""
    h, rt, log = s.h, s.rt, s.log
    eval_model = build_model(h, rt.device, s.bos_id)
    eval_model.load_state_dict(dequantize_state_dict(read_artifact(s.files.artifact)), strict=True)
    eval_model.looping = h.num_loops > 0
    shipped = s.compile_fn(eval_model)
    roundtrip = s.score(shipped)
    log_final(log, "prequant", prequant, timed=False)
    penalty = roundtrip.val_bpb - prequant.val_bpb
    log_final(log, "int6_roundtrip", roundtrip, tail=f" quant_penalty_bpb:{penalty:+.5f}")
    check_score(roundtrip, "the artifact", h, "change the quantization settings")
    sliding = ttt = None
    if h.sliding:
        sliding = check_score(s.score(shipped, final=True), "the sliding evaluation", h, "")
        rate = sliding.scored_tokens / max(sliding.eval_time_ms / 1000.0, 1e-9)
        log(f"sliding_rate scored_tok_s:{rate:.0f} per_rank:{rate / rt.world_size:.0f}")
        lead = f"stride:{h.final_stride} seq_len:{h.effective_eval_seq_len} "
        log_final(log, "sliding_window", sliding, lead, f" scored_tokens:{sliding.scored_tokens}")
        if rt.device.type == "cuda":  # a CPU rate says nothing about the 8xH100 budget
            log_eval_projection(log, rate, rt.world_size)
    if h.ttt_enabled:  # last: it trains the artifact's model, and nothing may score it afterwards
        ttt = s.score(shipped, final=True, method=functools.partial(evaluate_ttt, h=h))
        log_final(log, "ttt", ttt, tail=f" scored_tokens:{ttt.scored_tokens}")
        check_score(ttt, "test-time training", h, "it diverged: lower TTT_LR")
        if rt.device.type == "cuda":
            rate = ttt.scored_tokens / max(ttt.eval_time_ms / 1000.0, 1e-9)
            log_eval_projection(log, rate, rt.world_size, "_ttt", "lower TTT_EPOCHS")
    return {"prequant": prequant, "roundtrip": roundtrip, "sliding": sliding, "ttt": ttt}


def write_summary(s: Session, code: bytes, bytes_model: int, results: dict) -> dict:
    """{RUN_ID}.json: the run's score (TTT, else sliding, else round trip), every final score,
    the bytes, the clock and the settings."""
    h, state = s.h, s.state
    final = results["ttt"] or results["sliding"] or results["roundtrip"]
    scores = {f"{name}_val_bpb": r and r.val_bpb for name, r in results.items()}
    scores |= {f"{name}_val_loss": r and r.val_loss for name, r in results.items()}
    bytes_total = bytes_model + len(code)
    summary = {
        "run_id": s.files.run_id, "preset": h.preset, "seed": h.seed,
        "val_bpb": final.val_bpb, "val_loss": final.val_loss, **scores,
        "scored_tokens": final.scored_tokens, "val_tokens": s.val_tokens.numel(),
        "bytes_model": bytes_model, "bytes_code": len(code), "bytes_total": bytes_total,
        "fits": bytes_total <= SIZE_LIMIT_BYTES, "steps": state.step,
        "train_time_ms": round(state.train_time_ms, 1),
        "step_avg_ms": round(state.train_time_ms / max(state.step, 1), 3),
        "world_size": s.rt.world_size, "artifact_path": str(s.files.artifact),
        "raw_checkpoint_path": str(s.files.raw), "code_sha256": hashlib.sha256(code).hexdigest(),
        "hyperparameters": {**h.as_env(), "RUN_ID": s.files.run_id},
        "env_overrides": h.overrides(), "val_history": state.val_history,
    }  # fmt: skip
    if s.rt.master:
        atomic_write_bytes(s.files.summary, (json.dumps(summary, indent=2) + "\n").encode())
        s.log(
            f"run_complete run_id:{s.files.run_id} val_loss:{final.val_loss:.8f} "
            f"val_bpb:{final.val_bpb:.8f}"
        )
    return summary


def main(env=None) -> dict | None:
    env = os.environ if env is None else env
    code_path = Path(__file__).resolve()
    code = code_path.read_bytes()
    h = Hyperparameters.from_env(env)
    rt = init_runtime(h, env)
    summary = run(h, rt, env, code, code_path.name)
    if rt.distributed:
        rt.barrier()  # tearing down gloo while a peer is still busy can abort the process
        dist.destroy_process_group()
    return summary


def cli(argv: list[str] | None = None) -> int:
    """The command: an `error:` line and a non-zero status on failure. A failing rank of a
    distributed run exits at once, without tearing down: peers blocked in a collective fail fast."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--help"], ["-h"]):
        for f in dataclasses.fields(Hyperparameters):
            value = int(f.default) if isinstance(f.default, bool) else f.default
            print(f"{f.name.upper():<27} {str(value) or '(empty)':<24} {f.metadata['doc']}")
        return 0
    if argv:
        sys.exit(f"error: no arguments ({' '.join(argv)}): settings are variables, see --help")
    try:
        main()
        return 0
    except BaseException as e:
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
        if isinstance(e, StopRequested):
            status = 128 + e.signum
        if not isinstance(e, (*RUN_ERRORS, StopRequested, KeyboardInterrupt)):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            sys.stdout.flush()
            os._exit(status)
        return status


if __name__ == "__main__":
    sys.exit(cli())
