"""Parameter-golf trainer: a small GPT trained under a wall-clock cap, shipped as an int6+zstd artifact.

Run on 8 GPUs:  torchrun --standalone --nproc_per_node=8 train_gpt.py
Run on CPU:     DEVICE=cpu python3 train_gpt.py   (small settings, see README.md)

Everything is configured through environment variables (the `Hyperparameters` fields, upper-cased).
The file reads top to bottom: configuration, data, byte counting, model, optimizers, quantization
and the artifact, evaluation, the training loop, and `main`. Importing it does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import fnmatch
import glob
import hashlib
import io
import json
import math
import os
import platform
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------

SIZE_LIMIT_BYTES = 16_000_000  # the challenge's artifact cap: code bytes + model bytes (decimal)
FINEWEB_VAL_TOKENS = 63_779_840  # the published validation split, for eval-time projections
EVAL_BUDGET_SECONDS = 600.0  # evaluation has its own 10-minute budget on 8xH100


def _knob(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Hyperparameters:
    """Every setting; the environment variable is the field name upper-cased."""

    # Data and bookkeeping
    data_path: str = _knob("./data/datasets/fineweb10B_sp1024", "folder with fineweb_{train,val}_*.bin shards")
    tokenizer_path: str = _knob("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model of the shards")
    run_id: str = _knob("", "name of logs/artifacts; empty = a fresh random id")
    seed: int = _knob(1337, "seed for initialization")
    log_dir: str = _knob("logs", "folder for {RUN_ID}.txt and {RUN_ID}.json")
    artifact_dir: str = _knob("artifacts", "folder for the raw checkpoint and the compressed artifact")
    init_checkpoint: str = _knob("", "raw checkpoint to start from (with ITERATIONS=0: re-export and re-score it)")
    # Validation
    val_batch_size: int = _knob(524_288, "validation tokens per batch across all ranks")
    val_loss_every: int = _knob(1000, "validate every N steps (0 = only at the end)")
    train_log_every: int = _knob(200, "log the training loss every N steps")
    eval_seq_len: int = _knob(0, "window length of the final evaluation (0 = TRAIN_SEQ_LEN)")
    eval_stride: int = _knob(64, "sliding-window stride (0 or >= EVAL_SEQ_LEN = plain evaluation)")
    eval_batch_seqs: int = _knob(0, "windows per evaluation batch and rank (0 = from VAL_BATCH_SIZE)")
    # Training length
    iterations: int = _knob(20_000, "maximum number of optimizer steps")
    warmdown_iters: int = _knob(3000, "LR decays linearly to 0 over the last N steps (wall-clock estimated)")
    warmup_steps: int = _knob(20, "compile-priming steps whose effects are undone before training")
    train_batch_tokens: int = _knob(524_288, "tokens per optimizer step across all ranks and micro-steps")
    train_seq_len: int = _knob(1024, "training sequence length")
    max_wallclock_seconds: float = _knob(600.0, "training-time cap, validation excluded (0 = no cap)")
    grad_accum_steps: int = _knob(0, "micro-steps per optimizer step (0 = 8 / WORLD_SIZE)")
    # Model
    vocab_size: int = _knob(1024, "vocabulary size; must equal the tokenizer's")
    num_layers: int = _knob(9, "transformer blocks")
    num_kv_heads: int = _knob(4, "key/value heads (GQA)")
    model_dim: int = _knob(512, "width of the residual stream")
    num_heads: int = _knob(8, "query heads")
    mlp_mult: int = _knob(3, "MLP hidden width = MLP_MULT * MODEL_DIM")
    tie_embeddings: bool = _knob(True, "output head shares the token embedding")
    rope_base: float = _knob(10000.0, "RoPE base frequency")
    logit_softcap: float = _knob(30.0, "logits = c * tanh(logits / c)")
    qk_gain_init: float = _knob(1.5, "initial per-head gain on normalized queries")
    tied_embed_init_std: float = _knob(0.005, "init std of the tied embedding")
    smear_gate: bool = _knob(True, "blend each token's embedding with the previous token's")
    # Optimizers
    embed_lr: float = _knob(0.6, "Adam LR of an untied embedding")
    head_lr: float = _knob(0.008, "Adam LR of an untied output head")
    tied_embed_lr: float = _knob(0.03, "Adam LR of the tied embedding")
    matrix_lr: float = _knob(0.02, "Muon LR of the block matrices")
    scalar_lr: float = _knob(0.02, "Adam LR of vectors and scalars")
    muon_momentum: float = _knob(0.99, "Muon momentum after warm-up")
    muon_backend_steps: int = _knob(5, "Newton-Schulz iterations")
    muon_momentum_warmup_start: float = _knob(0.92, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = _knob(1500, "steps to reach MUON_MOMENTUM")
    beta1: float = _knob(0.9, "Adam beta1")
    beta2: float = _knob(0.95, "Adam beta2")
    adam_eps: float = _knob(1e-8, "Adam epsilon")
    grad_clip_norm: float = _knob(1.0, "clip the global gradient norm (0 = off)")
    # Quantization and the artifact
    qat: bool = _knob(True, "fake-quantize block matrices to int6 in the training forward (STE)")
    embed_quant: str = _knob("fp16", "token embedding in the artifact: fp16 or int8")
    fp16_keep: str = _knob("", "comma-separated name patterns (fnmatch) kept in fp16, e.g. blocks.8.attn.c_k.weight")
    quant_clip_percentile: float = _knob(99.99984, "per-row clip at this percentile of |w|")
    zstd_level: int = _knob(22, "zstd compression level of the artifact")
    # Devices
    device: str = _knob("auto", "auto, cuda or cpu")
    compile: str = _knob("auto", "torch.compile: auto (on CUDA), 0 or 1")

    @classmethod
    def env_names(cls) -> list[str]:
        return [f.name.upper() for f in dataclasses.fields(cls)]

    @classmethod
    def from_env(cls, env) -> "Hyperparameters":
        values = {}
        for f in dataclasses.fields(cls):
            name = f.name.upper()
            if name in env:
                values[f.name] = _parse_value(name, env[name], type(f.default))
        h = cls(**values)
        h.validate()
        return h

    def validate(self) -> None:
        positive = ["vocab_size", "num_layers", "num_kv_heads", "model_dim", "num_heads", "mlp_mult",
                    "train_seq_len", "train_batch_tokens", "val_batch_size", "muon_backend_steps", "rope_base",
                    "adam_eps"]
        non_negative = ["iterations", "warmdown_iters", "warmup_steps", "val_loss_every", "train_log_every",
                        "eval_seq_len", "eval_stride", "eval_batch_seqs", "grad_accum_steps",
                        "max_wallclock_seconds", "embed_lr", "head_lr", "tied_embed_lr", "matrix_lr",
                        "scalar_lr", "grad_clip_norm", "muon_momentum_warmup_steps",
                        "tied_embed_init_std"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.upper()}={getattr(self, name)} must be positive")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name.upper()}={getattr(self, name)} must not be negative")
        for name in ["beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name.upper()}={getattr(self, name)} must be in [0, 1)")
        if self.model_dim % self.num_heads:
            raise ValueError(f"MODEL_DIM={self.model_dim} is not divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"NUM_HEADS={self.num_heads} is not divisible by NUM_KV_HEADS={self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} must be even (RoPE rotates pairs)")
        if self.vocab_size > 65536:
            raise ValueError(f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shard format (max 65536)")
        if self.logit_softcap <= 0:
            raise ValueError(f"LOGIT_SOFTCAP={self.logit_softcap} must be positive")
        if not 0.0 < self.quant_clip_percentile <= 100.0:
            raise ValueError(f"QUANT_CLIP_PERCENTILE={self.quant_clip_percentile} must be in (0, 100]")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"ZSTD_LEVEL={self.zstd_level} must be in 1..22")
        for name, allowed in [("embed_quant", ("fp16", "int8")), ("device", ("auto", "cuda", "cpu")),
                              ("compile", ("auto", "0", "1"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.upper()}={getattr(self, name)!r} must be one of {', '.join(allowed)}")

    @property
    def effective_eval_seq_len(self) -> int:
        return self.eval_seq_len or self.train_seq_len

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
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}={raw!r} must be finite")
        return value
    return raw


def misspelled_settings(env) -> list[str]:
    """Warnings for variables that look like one of ours but are not (MLP_MUL -> MLP_MULT)."""
    known = Hyperparameters.env_names()
    warnings = []
    for key in sorted(env):
        if key in known or not key.isupper():
            continue
        match = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if match:
            warnings.append(f"warning: {key} is not a setting of this script; did you mean {match[0]}?")
    return warnings


def resolve_grad_accum_steps(h: Hyperparameters, world_size: int) -> int:
    if h.grad_accum_steps:
        steps = h.grad_accum_steps
    elif 8 % world_size == 0:
        steps = 8 // world_size
    else:
        raise ValueError(f"WORLD_SIZE={world_size} does not divide 8; set GRAD_ACCUM_STEPS explicitly")
    per_micro = world_size * steps * h.train_seq_len
    if h.train_batch_tokens % per_micro:
        raise ValueError(
            f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} does not split into whole sequences: it must be a multiple "
            f"of WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN={world_size}*{steps}*{h.train_seq_len}={per_micro}")
    return steps


def windows_per_batch(h: Hyperparameters, world_size: int, grad_accum_steps: int, seq_len: int) -> int:
    """Evaluation windows per batch and rank: EVAL_BATCH_SEQS, or VAL_BATCH_SIZE split like a training batch."""
    return h.eval_batch_seqs or max(1, h.val_batch_size // (world_size * grad_accum_steps * seq_len))


# -----------------------------------------------------------------------------
# Data: shards and the distributed loader
# -----------------------------------------------------------------------------

SHARD_MAGIC = 20240520  # header[0] of every fineweb_*.bin shard
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256  # int32 words before the uint16 tokens
BOS_ID = 1  # every document starts with it (SentencePiece bos_id)

DATA_HELP = ("download the published shards with `python3 data/cached_challenge_fineweb.py --variant sp1024`, "
             "or build an offline dataset with `python3 data/build_dataset.py`, then set DATA_PATH, "
             "TOKENIZER_PATH and VOCAB_SIZE")


def load_data_shard(path: Path) -> Tensor:
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header.size != SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard (bad magic/version in the header); re-download or rebuild it")
    num_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + num_tokens * 2
    if path.stat().st_size != expected:
        raise ValueError(f"{path}: size {path.stat().st_size} bytes, header says {expected}; "
                         "the file is truncated or corrupt, re-download or rebuild it")
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=SHARD_HEADER_INTS * 4)
    return torch.from_numpy(tokens.astype(np.int32))


def shard_files(pattern: str) -> list[Path]:
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; {DATA_HELP}")
    return files


class TokenStream:
    """Reads shards in order, forever, wrapping around at the end."""

    def __init__(self, pattern: str):
        self.files = shard_files(pattern)
        self.file_idx = 0
        self.tokens = load_data_shard(self.files[0])
        self.pos = 0

    def take(self, n: int) -> Tensor:
        chunks, remaining = [], n
        while remaining > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = load_data_shard(self.files[self.file_idx])
                self.pos = 0
            k = min(remaining, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    """Each call takes one contiguous span per rank from a single shared stream: deterministic and disjoint."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stream = TokenStream(pattern)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1  # one extra token for the shifted targets
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span:(self.rank + 1) * span].to(torch.int64)
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern: str, min_tokens: int) -> Tensor:
    tokens = torch.cat([load_data_shard(p) for p in shard_files(pattern)])
    if tokens.numel() < min_tokens + 1:
        raise ValueError(f"validation split {pattern} has {tokens.numel()} tokens; need at least {min_tokens + 1} "
                         "(one sequence and its shifted target)")
    return tokens


# -----------------------------------------------------------------------------
# Byte counting for bits per byte
# -----------------------------------------------------------------------------


@dataclass
class ByteLuts:
    """Per token id: UTF-8 bytes of the piece, whether it starts with "▁", whether it is a boundary token."""

    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor

    def to(self, device) -> "ByteLuts":
        return ByteLuts(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

    def count(self, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Bytes of each target token; the leading space counts unless the previous token is a boundary."""
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
    return ByteLuts(torch.from_numpy(base_bytes), torch.from_numpy(has_leading_space), torch.from_numpy(is_boundary))


def load_tokenizer(h: Hyperparameters) -> spm.SentencePieceProcessor:
    if not Path(h.tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer not found at TOKENIZER_PATH={h.tokenizer_path}; {DATA_HELP}")
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    if sp.get_piece_size() != h.vocab_size:
        raise ValueError(f"VOCAB_SIZE={h.vocab_size} but the tokenizer {h.tokenizer_path} has "
                         f"{sp.get_piece_size()} pieces; set VOCAB_SIZE={sp.get_piece_size()}")
    return sp


# -----------------------------------------------------------------------------
# Quantization: one function for the training forward (STE) and the export
# -----------------------------------------------------------------------------

INT6_MAX = 31  # int6 levels -31..31
INT8_MAX = 127
MIN_SCALE = 2.0**-24  # smallest fp16 subnormal: keeps the scale representable, swallows nothing


def round_to_fp16_grid(x: Tensor) -> Tensor:
    """x (positive fp32) rounded to the nearest fp16 value, kept in fp32.

    Written as arithmetic because torch.compile drops an fp32->fp16->fp32 cast pair, which would let the
    compiled training forward quantize with a different scale than the export.
    """
    _, exponent = torch.frexp(x)
    ulp = torch.exp2((exponent - 11).clamp_min(-24).float())  # fp16: 11 significant bits, subnormal step 2^-24
    return torch.round(x / ulp) * ulp


def quantize_per_row(w: Tensor, max_level: int, clip_percentile: float) -> tuple[Tensor, Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: integer levels (int8) and fp16 scales (rows,).

    Each row is clipped at the nearest-rank percentile of |w| (at 100 and for short rows: the row max).
    """
    w = w.float()
    absw = w.abs()
    n = w.shape[1]
    k = math.ceil(round(clip_percentile * n / 100.0, 9))  # round: 99.9/100*1000 is 999.0000000000001 in floats
    clip = absw.amax(dim=1) if k >= n else absw.kthvalue(max(k, 1), dim=1).values
    scale = round_to_fp16_grid((clip / max_level).clamp_min(MIN_SCALE))
    q = torch.clamp(torch.round(w / scale[:, None]), -max_level, max_level).to(torch.int8)
    return q, scale.to(torch.float16)


def dequantize_per_row(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def fake_quantize(w: Tensor, max_level: int, clip_percentile: float) -> Tensor:
    """Forward: the exported (dequantized) weight. Backward: identity (straight-through estimator)."""
    q, scale = quantize_per_row(w.detach(), max_level, clip_percentile)
    return w + (dequantize_per_row(q, scale).to(w.dtype) - w).detach()


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------

CONTROL_PARAM_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "smear")


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 master weight, computed in the activation dtype; optionally fake-quantized to int6 when training."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat_clip_percentile = 0.0  # > 0 turns on int6 fake-quant (set by GPT.configure_qat)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.training and self.qat_clip_percentile > 0:
            w = fake_quantize(w, INT6_MAX, self.qat_clip_percentile)
        return F.linear(x, w.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, seq_len: int, device, dtype) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, D/2)
        return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.num_heads, self.num_kv_heads = h.num_heads, h.num_kv_heads
        self.head_dim = h.model_dim // h.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(h.model_dim, h.model_dim)
        self.c_k = CastedLinear(h.model_dim, kv_dim)
        self.c_v = CastedLinear(h.model_dim, kv_dim)
        self.proj = CastedLinear(h.model_dim, h.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.rotary = Rotary(self.head_dim, h.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.fc = CastedLinear(h.model_dim, h.mlp_mult * h.model_dim)
        self.proj = CastedLinear(h.mlp_mult * h.model_dim, h.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.attn = CausalSelfAttention(h)
        self.mlp = MLP(h)
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0  # blend the residual stream with the embedding stream
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class SmearGate(nn.Module):
    """x[t] <- (1-g) x[t] + g x[t-1] per channel, g = sigmoid(gate); no blend at a BOS or at position 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        x_prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, C), shifted right by one token
        blend = (input_ids != BOS_ID)
        blend[:, 0] = False  # the previous token is unknown here
        return x + blend[..., None].to(x.dtype) * g * (x_prev - x)


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.logit_softcap = h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.smear = SmearGate(h.model_dim) if h.smear_gate else None
        self.num_encoder_layers = h.num_layers // 2
        self.num_skips = min(self.num_encoder_layers, h.num_layers - self.num_encoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, h.model_dim))
        self.blocks = nn.ModuleList(Block(h) for _ in range(h.num_layers))
        self.lm_head = None if h.tie_embeddings else CastedLinear(h.model_dim, h.vocab_size, zero_init=True)

    def configure_qat(self, enabled: bool, clip_percentile: float, fp16_keep: list[str]) -> None:
        """Fake-quantize exactly the tensors the export stores as int6."""
        for name, module in self.named_modules():
            if isinstance(module, CastedLinear):
                int6 = export_kind(f"{name}.weight", module.weight, "fp16", fp16_keep) == "int6"
                module.qat_clip_percentile = clip_percentile if enabled and int6 else 0.0

    def hidden(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.smear is not None:
            x = self.smear(x, input_ids)
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder_layers and skips:  # U-Net: decoder layer i takes encoder layer L-1-i
                x = x + self.skip_weights[i - self.num_encoder_layers].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder_layers:
                skips.append(x)
        return rms_norm(x)

    def forward(self, input_ids: Tensor, target_ids: Tensor | None = None, *,
                score_last: int = 0, reduction: str = "mean") -> Tensor:
        """input_ids (B, T). No targets: logits (B, T, V). With targets: cross-entropy, mean or per token.

        score_last=k sends only the last k positions through the head; target_ids is then (B, k).
        """
        x = self.hidden(input_ids)  # (B, T, C)
        if score_last:
            x = x[:, -score_last:]
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight.to(x.dtype)).float()
        logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if target_ids is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.view(target_ids.shape)


def model_flops_per_token(h: Hyperparameters, model: GPT) -> float:
    """Training FLOPs per token: 6 per matmul weight plus attention scores (PaLM's 6N + 12 L d T)."""
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "blocks." in n)
    matmul += h.vocab_size * h.model_dim  # the output head, tied or not
    return 6.0 * matmul + 12.0 * h.num_layers * h.model_dim * h.train_seq_len


# -----------------------------------------------------------------------------
# Optimizers and schedules
# -----------------------------------------------------------------------------


def zeropower_via_newtonschulz5(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize g (singular values pushed into a band around 1) with a quintic iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalized updates for 2-D matrices.

    Rank r orthogonalizes parameters r, r+W, r+2W, ...; the flat updates are summed across ranks so every
    rank applies the same update. Gradients must already be averaged across ranks (DDP does it).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 zeropower=zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.zeropower = zeropower

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    g = self.zeropower(g, steps=group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5  # equal RMS for tall and wide matrices
                    flat[offset:offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if world_size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(h: Hyperparameters, model: GPT, zeropower, fused: bool) -> list[torch.optim.Optimizer]:
    """The baseline's groups: Muon for block matrices; Adam for the embedding, the head, and vectors/scalars."""
    block_named = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.")]
    matrices = [p for n, p in block_named if p.ndim == 2 and not any(c in n for c in CONTROL_PARAM_NAMES)]
    scalars = [p for n, p in block_named if p.ndim < 2 or any(c in n for c in CONTROL_PARAM_NAMES)]
    scalars += [model.skip_weights] + ([model.smear.gate] if model.smear is not None else [])
    adam = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, fused=fused)
    embed_lr = h.tied_embed_lr if h.tie_embeddings else h.embed_lr
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.Adam([{"params": [model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr}], **adam),
        Muon([{"params": matrices, "base_lr": h.matrix_lr}], lr=h.matrix_lr, momentum=h.muon_momentum,
             backend_steps=h.muon_backend_steps, zeropower=zeropower),
        torch.optim.Adam([{"params": scalars, "lr": h.scalar_lr, "base_lr": h.scalar_lr}], **adam),
    ]
    if model.lm_head is not None:
        optimizers.append(torch.optim.Adam(
            [{"params": [model.lm_head.weight], "lr": h.head_lr, "base_lr": h.head_lr}], **adam))
    return optimizers


def lr_multiplier(step: int, elapsed_ms: float, *, iterations: int, warmdown_iters: int,
                  max_wallclock_ms: float | None) -> float:
    """LR scale: 1, then a linear warmdown to 0 over the last WARMDOWN_ITERS steps.

    Under a wall-clock cap the warmdown starts when the remaining time equals WARMDOWN_ITERS steps at the
    average step time so far, so the LR reaches 0 when the cap does.
    """
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms is None:
        warmdown_start = max(iterations - warmdown_iters, 0)
        if warmdown_start <= step < iterations:
            return max((iterations - step) / warmdown_iters, 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum_at(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end


# -----------------------------------------------------------------------------
# The artifact: export, container, size accounting
# -----------------------------------------------------------------------------

ARTIFACT_MAGIC = b"PGOLF-Q\x00"  # 8 bytes before the zstd frame
ARTIFACT_FORMAT_VERSION = 1


class ArtifactError(ValueError):
    pass


def export_kind(name: str, tensor: Tensor, embed_quant: str, fp16_keep: list[str]) -> str:
    """How a tensor is stored: int6 (block matrices), int8 or fp16 (embedding / head), fp16 (kept), float."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in fp16_keep):
        return "fp16"
    if name == "tok_emb.weight":
        return embed_quant
    if name == "lm_head.weight":
        return "int8"
    if name.startswith("blocks.") and tensor.ndim == 2 and not any(c in name for c in CONTROL_PARAM_NAMES):
        return "int6"
    return "float"


def quantize_state_dict(state: dict[str, Tensor], h: Hyperparameters) -> dict:
    keep = [p for p in h.fp16_keep.split(",") if p.strip()]
    entries = {}
    for name, t in state.items():
        t = t.detach().cpu()
        kind = export_kind(name, t, h.embed_quant, keep)
        if kind in ("int6", "int8"):
            q, scale = quantize_per_row(t, INT6_MAX if kind == "int6" else INT8_MAX, h.quant_clip_percentile)
            entries[name] = {"kind": kind, "q": q, "scale": scale}
        elif kind == "fp16":
            entries[name] = {"kind": kind, "data": t.to(torch.float16)}
        else:
            entries[name] = {"kind": kind, "data": t.float().clone()}
    return {"format": "pgolf-int6", "version": ARTIFACT_FORMAT_VERSION, "tensors": entries}


def dequantize_state_dict(payload: dict) -> dict[str, Tensor]:
    out = {}
    for name, e in payload["tensors"].items():
        out[name] = dequantize_per_row(e["q"], e["scale"]) if e["kind"] in ("int6", "int8") else e["data"].float()
    return out


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


def torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def artifact_bytes(payload: dict, zstd_level: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
    return ARTIFACT_MAGIC + compressor.compress(torch_save_bytes(payload))


def read_artifact(path: Path) -> dict:
    """Load an artifact without executing code from it (weights_only), with clear errors on damage."""
    blob = Path(path).read_bytes()
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ArtifactError(f"{path}: not an artifact of this script (bad magic)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob[len(ARTIFACT_MAGIC):])
    except (zstandard.ZstdError, MemoryError) as e:  # a damaged header can declare an absurd content size
        raise ArtifactError(f"{path}: truncated or corrupt artifact ({str(e) or type(e).__name__}); "
                            "re-export it from the raw checkpoint") from None
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ArtifactError(f"{path}: unreadable artifact payload ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != "pgolf-int6":
        raise ArtifactError(f"{path}: payload is not a pgolf-int6 artifact")
    if payload.get("version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {payload.get('version')}, this script reads "
                            f"version {ARTIFACT_FORMAT_VERSION}")
    return payload


def load_raw_checkpoint(path: str, model: nn.Module) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"INIT_CHECKPOINT={path} does not exist")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)


# -----------------------------------------------------------------------------
# Evaluation: every validation target scored exactly once
# -----------------------------------------------------------------------------


def plan_windows(num_targets: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """Windows as (start, scored): targets [start, start+w) go in, the last `scored` of them are scored.

    w = min(seq_len, num_targets). The first window scores all its targets; each later window ends `stride`
    further (the last one ends at the end of the split) and scores only the targets no earlier window
    scored, so each target is scored once, after at least min(position, w - stride) tokens of context.
    stride <= 0 or >= w means non-overlapping windows (plain evaluation).
    """
    if num_targets <= 0:
        return []
    w = min(seq_len, num_targets)
    if stride <= 0 or stride >= w:
        stride = w
    windows = [(0, w)]
    scored_end = w
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


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, luts: ByteLuts, *, seq_len: int, stride: int, batch_seqs: int,
             rank: int = 0, world_size: int = 1, autocast=contextlib.nullcontext) -> EvalResult:
    """Mean cross-entropy (nats) and bits per byte over all targets of `tokens` (a 1-D tensor on the device).

    The windows are split into contiguous ranges per rank; consecutive windows that score the same number
    of targets start that many tokens apart, so each batch is a strided view of the split.
    """
    t0 = time.perf_counter()
    windows = plan_windows(tokens.numel() - 1, seq_len, stride)
    mine = windows[len(windows) * rank // world_size:len(windows) * (rank + 1) // world_size]
    w = min(seq_len, tokens.numel() - 1)
    sums = torch.zeros(3, device=tokens.device, dtype=torch.float64)  # loss, targets, bytes
    i = 0
    while i < len(mine):
        start, n = mine[i]
        j = i + 1
        while j < len(mine) and j - i < batch_seqs and mine[j][1] == n and mine[j][0] == mine[j - 1][0] + n:
            j += 1
        span = (j - i - 1) * n + w
        x = tokens[start:start + span].unfold(0, w, n).long()  # (B, w)
        y = tokens[start + 1:start + span + 1].unfold(0, w, n)[:, w - n:].long()  # (B, n)
        with autocast():
            losses = model(x, y, score_last=n, reduction="none")
        sums[0] += losses.double().sum()
        sums[1] += y.numel()
        sums[2] += luts.count(x[:, w - n:], y).sum()
        i = j
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    loss_sum, count, byte_count = sums.tolist()
    val_loss = loss_sum / count
    return EvalResult(val_loss=val_loss, val_bpb=val_loss / math.log(2.0) * count / byte_count,
                      scored_tokens=int(count), scored_bytes=int(byte_count),
                      eval_time_ms=1000.0 * (time.perf_counter() - t0))


# -----------------------------------------------------------------------------
# Runtime: processes, devices, logging
# -----------------------------------------------------------------------------


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    use_compile: bool
    host_group: object  # a gloo group for host-side agreement (run id, stop decision) without device sync

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def init_runtime(h: Hyperparameters, env) -> Runtime:
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    want = h.device if h.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE=cuda but no CUDA device is available; use DEVICE=cpu or DEVICE=auto")
    device = torch.device("cuda", local_rank) if want == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    host_group = None
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
        host_group = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    use_compile = h.compile == "1" or (h.compile == "auto" and device.type == "cuda")
    return Runtime(rank, local_rank, world_size, device, use_compile, host_group)


class Logger:
    """Rank 0 writes; each line is appended and closed at once, so the log survives a crash as it stands."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.open("xb").close()

    def _append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        self._append((msg + "\n").encode("utf-8"))

    def write_code(self, code: bytes, name: str) -> None:
        if self.path is not None:
            header = f"code_begin path:{name} bytes:{len(code)} sha256:{hashlib.sha256(code).hexdigest()}\n"
            self._append(header.encode() + code + b"\ncode_end\n")


BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def broadcast_run_id(h: Hyperparameters, rt: Runtime) -> str:
    run_id = [h.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]]
    if rt.distributed:
        dist.broadcast_object_list(run_id, src=0, group=rt.host_group)
    return run_id[0]


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    pass


def check_finite(first_bad_step: Tensor, rt: Runtime) -> None:
    """Raise on every rank if any rank saw a non-finite loss (first_bad_step >= 0); syncs the host."""
    bad = torch.where(first_bad_step < 0, torch.iinfo(torch.int64).max, first_bad_step)
    if rt.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if bad.item() != torch.iinfo(torch.int64).max:
        raise NonFiniteLoss(f"non-finite training loss at step {bad.item() + 1}; lower the learning rates or "
                            "GRAD_CLIP_NORM, or check the data")


def train_step(*, model, loader, optimizers, base_model, h: Hyperparameters, rt: Runtime, grad_accum_steps: int,
               lr_scale: float, momentum: float) -> Tensor:
    """One optimizer step (all micro-steps); returns the mean training loss as a device tensor (no sync)."""
    local_tokens = h.train_batch_tokens // (rt.world_size * grad_accum_steps)
    total = torch.zeros((), device=rt.device)
    for micro in range(grad_accum_steps):
        x, y = loader.next_batch(local_tokens, h.train_seq_len)
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro == grad_accum_steps - 1
        with rt.autocast():
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
        total += loss.detach()
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        if isinstance(opt, Muon):
            opt.param_groups[0]["momentum"] = momentum
    if h.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(base_model.parameters(), h.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / grad_accum_steps


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    val_history: list
    final: EvalResult | None


def train(*, h: Hyperparameters, rt: Runtime, grad_accum_steps: int, base_model: GPT, model, optimizers,
          val_tokens: Tensor, luts: ByteLuts, log: Logger, eval_model) -> TrainResult:
    train_pattern = os.path.join(h.data_path, "fineweb_train_*.bin")
    loader = DistributedTokenLoader(train_pattern, rt.rank, rt.world_size, rt.device)
    max_wallclock_ms = 1000.0 * h.max_wallclock_seconds if h.max_wallclock_seconds > 0 else None
    flops_per_step = model_flops_per_token(h, base_model) * h.train_batch_tokens
    peak = device_peak_flops(rt.device)
    eval_batch = windows_per_batch(h, rt.world_size, grad_accum_steps, h.train_seq_len)

    def step_kwargs(step: int, elapsed_ms: float) -> dict:
        return dict(model=model, loader=loader, optimizers=optimizers, base_model=base_model, h=h, rt=rt,
                    grad_accum_steps=grad_accum_steps,
                    lr_scale=lr_multiplier(step, elapsed_ms, iterations=h.iterations,
                                           warmdown_iters=h.warmdown_iters, max_wallclock_ms=max_wallclock_ms),
                    momentum=muon_momentum_at(step, start=h.muon_momentum_warmup_start, end=h.muon_momentum,
                                              warmup_steps=h.muon_momentum_warmup_steps))

    if h.warmup_steps > 0 and h.iterations > 0:
        # Prime compilation and allocator on real steps, then undo every effect: weights, optimizer
        # state and the data position are all restored, so training starts exactly as with no warm-up.
        model_state = copy.deepcopy(base_model.state_dict())
        opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        t_warm = time.perf_counter()
        for _ in range(h.warmup_steps):
            train_step(**step_kwargs(0, 0.0))
        rt.sync()
        base_model.load_state_dict(model_state)
        for opt, state in zip(optimizers, opt_states):
            opt.load_state_dict(state)
        loader = DistributedTokenLoader(train_pattern, rt.rank, rt.world_size, rt.device)
        log(f"warmup_steps:{h.warmup_steps} warmup_time:{1000 * (time.perf_counter() - t_warm):.0f}ms (undone)")

    history, final = [], None
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=rt.device)
    train_time_ms, step, stop_after_step = 0.0, 0, None
    rt.sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == h.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step or (h.val_loss_every > 0 and step % h.val_loss_every == 0):
            rt.sync()
            train_time_ms += 1000.0 * (time.perf_counter() - t0)
            base_model.eval()
            result = evaluate(eval_model, val_tokens, luts, seq_len=h.train_seq_len, stride=0,
                              batch_seqs=eval_batch, rank=rt.rank, world_size=rt.world_size, autocast=rt.autocast)
            base_model.train()
            history.append({"step": step, "train_time_ms": round(train_time_ms, 1), "val_loss": result.val_loss,
                            "val_bpb": result.val_bpb})
            log(f"step:{step}/{h.iterations} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
                f"train_time:{train_time_ms:.0f}ms step_avg:{train_time_ms / max(step, 1):.2f}ms")
            final = result
            rt.sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < h.iterations:
                log(f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{step}/{h.iterations}")
            break
        elapsed_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
        loss = train_step(**step_kwargs(step, elapsed_ms))
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        step += 1
        approx_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
        if step <= 5 or (h.train_log_every > 0 and step % h.train_log_every == 0) or step == h.iterations:
            loss_value = loss.detach().clone()
            if rt.distributed:  # logging steps may sync the host; ordinary steps never do
                dist.all_reduce(loss_value, op=dist.ReduceOp.SUM)
                loss_value /= rt.world_size
            check_finite(first_bad_step, rt)
            seconds = max(approx_ms / 1000.0, 1e-9)
            tok_s = h.train_batch_tokens * step / seconds
            mfu = f" mfu:{100 * flops_per_step * step / seconds / (peak * rt.world_size):.1f}%" if peak else ""
            log(f"step:{step}/{h.iterations} train_loss:{loss_value.item():.4f} train_time:{approx_ms:.0f}ms "
                f"step_avg:{approx_ms / step:.2f}ms tok_s:{tok_s:.0f}{mfu}")
        reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
        if rt.distributed and max_wallclock_ms is not None:  # host-side agreement: no device sync
            flag = torch.tensor([int(reached_cap)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=rt.host_group)
            reached_cap = bool(flag.item())
        if stop_after_step is None and reached_cap:
            stop_after_step = step
    check_finite(first_bad_step, rt)
    return TrainResult(steps=step, train_time_ms=train_time_ms, val_history=history, final=final)


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


def build_model(h: Hyperparameters, device: torch.device) -> GPT:
    model = GPT(h).to(device)
    model.configure_qat(h.qat, h.quant_clip_percentile, [p for p in h.fp16_keep.split(",") if p.strip()])
    return model


def versions() -> str:
    parts = [f"python:{platform.python_version()}", f"torch:{torch.__version__}", f"numpy:{np.__version__}",
             f"sentencepiece:{spm.__version__}", f"zstandard:{zstandard.__version__}"]
    if torch.cuda.is_available():
        parts += [f"cuda:{torch.version.cuda}", f"gpu:{torch.cuda.get_device_name()}"]
    return " ".join(parts)


def main(env=None) -> dict:
    env = os.environ if env is None else env
    code_path = Path(__file__).resolve()
    code = code_path.read_bytes()
    h = Hyperparameters.from_env(env)
    rt = init_runtime(h, env)
    try:
        return run(h, rt, env, code, code_path.name)
    finally:
        if rt.distributed:
            dist.destroy_process_group()


def run(h: Hyperparameters, rt: Runtime, env, code: bytes, code_name: str) -> dict:
    run_id = broadcast_run_id(h, rt)
    log_path = Path(h.log_dir) / f"{run_id}.txt"
    if log_path.exists():
        raise ValueError(f"RUN_ID={run_id}: {log_path} already exists; choose another RUN_ID (nothing is overwritten)")
    if rt.distributed:
        dist.barrier(group=rt.host_group)  # every rank checked before rank 0 creates the log
    log = Logger(log_path if rt.master else None)
    log.write_code(code, code_name)
    for line in misspelled_settings(env):
        log(line)
    for name, value in h.as_env().items():
        log(f"setting {name}:{value}", console=False)
    log("overrides: " + " ".join(f"{k}={v}" for k, v in h.overrides().items()))
    grad_accum_steps = resolve_grad_accum_steps(h, rt.world_size)
    log(f"run_id:{run_id} world_size:{rt.world_size} grad_accum_steps:{grad_accum_steps} device:{rt.device} "
        f"compile:{int(rt.use_compile)} {versions()}")
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)

    sp = load_tokenizer(h)
    luts = build_byte_luts(sp, h.vocab_size).to(rt.device)
    eval_seq_len = h.effective_eval_seq_len
    val_tokens = load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"),
                                        max(h.train_seq_len, eval_seq_len)).to(rt.device)
    shard_files(os.path.join(h.data_path, "fineweb_train_*.bin"))  # fail before building anything
    log(f"val_tokens:{val_tokens.numel()} tokenizer:{h.tokenizer_path} data:{h.data_path}")

    base_model = build_model(h, rt.device)
    if h.init_checkpoint:
        load_raw_checkpoint(h.init_checkpoint, base_model)
        log(f"init_checkpoint:{h.init_checkpoint}")
    n_params = sum(p.numel() for p in base_model.parameters())
    log(f"model_params:{n_params} layers:{h.num_layers} dim:{h.model_dim} heads:{h.num_heads}/{h.num_kv_heads} "
        f"mlp_mult:{h.mlp_mult} smear_gate:{int(h.smear_gate)} qat:{int(h.qat)}")
    compile_fn = (lambda m: torch.compile(m, dynamic=False, fullgraph=True)) if rt.use_compile else (lambda m: m)
    if rt.use_compile:  # training, plain and sliding evaluation of two models: ~12 static shapes of one forward
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    zeropower = torch.compile(zeropower_via_newtonschulz5) if rt.use_compile else zeropower_via_newtonschulz5
    compiled = compile_fn(base_model)
    model = DDP(compiled, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
                broadcast_buffers=False) if rt.distributed else compiled
    optimizers = build_optimizers(h, base_model, zeropower, fused=rt.device.type == "cuda")

    t_train = time.perf_counter()
    result = train(h=h, rt=rt, grad_accum_steps=grad_accum_steps, base_model=base_model, model=model,
                   optimizers=optimizers, val_tokens=val_tokens, luts=luts, log=log, eval_model=compiled)
    steps = result.steps
    if rt.device.type == "cuda":
        log(f"peak memory allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB "
            f"reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB")
    else:
        log(f"peak memory rss:{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}MiB")
    log(f"train_wall_time:{1000 * (time.perf_counter() - t_train):.0f}ms")

    # Raw weights first: they stay on disk whatever happens to the export.
    artifact_dir = Path(h.artifact_dir)
    raw_path = artifact_dir / f"{run_id}_raw.pt"
    artifact_path = artifact_dir / f"{run_id}.int6.ptz"
    if rt.master:
        atomic_write_bytes(raw_path, torch_save_bytes(base_model.state_dict()))
        t_export = time.perf_counter()
        blob = artifact_bytes(quantize_state_dict(base_model.state_dict(), h), h.zstd_level)
        atomic_write_bytes(artifact_path, blob)
        log(f"raw_checkpoint:{raw_path} artifact:{artifact_path} export_time:"
            f"{1000 * (time.perf_counter() - t_export):.0f}ms")
    if rt.distributed:
        dist.barrier()
    bytes_model, bytes_code = artifact_path.stat().st_size, len(code)
    bytes_total = bytes_model + bytes_code
    fits = bytes_total <= SIZE_LIMIT_BYTES
    log(f"Serialized model int6+zstd-{h.zstd_level}: {bytes_model} bytes")
    log(f"Code size: {bytes_code} bytes")
    log(f"Total submission size int6+zstd-{h.zstd_level}: {bytes_total} bytes")
    log(f"fits_16mb:{str(fits).lower()} margin:{SIZE_LIMIT_BYTES - bytes_total}")
    if not fits:
        log(f"WARNING: the submission is {bytes_total - SIZE_LIMIT_BYTES} bytes OVER the {SIZE_LIMIT_BYTES}-byte "
            "limit; shrink the model or change the quantization settings")

    # Round trip: a fresh model from the file on disk, scored on the whole validation split.
    eval_model = build_model(h, rt.device)
    eval_model.load_state_dict(dequantize_state_dict(read_artifact(artifact_path)), strict=True)
    eval_model.eval()
    eval_fn = compile_fn(eval_model)
    rt.sync()
    roundtrip = evaluate(eval_fn, val_tokens, luts, seq_len=h.train_seq_len, stride=0,
                         batch_seqs=windows_per_batch(h, rt.world_size, grad_accum_steps, h.train_seq_len),
                         rank=rt.rank, world_size=rt.world_size, autocast=rt.autocast)
    prequant = result.final
    log(f"final_prequant_exact val_loss:{prequant.val_loss:.8f} val_bpb:{prequant.val_bpb:.8f}")
    log(f"final_int6_roundtrip_exact val_loss:{roundtrip.val_loss:.8f} val_bpb:{roundtrip.val_bpb:.8f} "
        f"quant_penalty_bpb:{roundtrip.val_bpb - prequant.val_bpb:+.5f} eval_time:{roundtrip.eval_time_ms:.0f}ms")

    sliding = None  # the final evaluation, when it differs from the round trip's plain windows
    if 0 < h.eval_stride < eval_seq_len or eval_seq_len != h.train_seq_len:
        rt.sync()
        stride = h.eval_stride if 0 < h.eval_stride < eval_seq_len else eval_seq_len
        sliding = evaluate(eval_fn, val_tokens, luts, seq_len=eval_seq_len, stride=stride,
                           batch_seqs=windows_per_batch(h, rt.world_size, grad_accum_steps, eval_seq_len),
                           rank=rt.rank, world_size=rt.world_size, autocast=rt.autocast)
        rate = sliding.scored_tokens / max(sliding.eval_time_ms / 1000.0, 1e-9)
        projected_s = FINEWEB_VAL_TOKENS / (rate / rt.world_size * 8)
        log(f"final_sliding_window_exact stride:{stride} seq_len:{eval_seq_len} "
            f"val_loss:{sliding.val_loss:.8f} val_bpb:{sliding.val_bpb:.8f} scored_tokens:{sliding.scored_tokens} "
            f"eval_time:{sliding.eval_time_ms:.0f}ms")
        log(f"sliding_rate scored_tok_s:{rate:.0f} per_rank:{rate / rt.world_size:.0f} "
            f"projected_fineweb_8gpu:{projected_s:.1f}s")
        if projected_s > EVAL_BUDGET_SECONDS:
            log(f"WARNING: at this rate the full {FINEWEB_VAL_TOKENS}-token split would take {projected_s:.0f}s on "
                f"8 such devices, over the {EVAL_BUDGET_SECONDS:.0f}s evaluation budget; raise EVAL_STRIDE")
    score = sliding or roundtrip
    summary = {
        "run_id": run_id, "seed": h.seed, "val_bpb": score.val_bpb, "val_loss": score.val_loss,
        "prequant_val_bpb": prequant.val_bpb, "prequant_val_loss": prequant.val_loss,
        "roundtrip_val_bpb": roundtrip.val_bpb, "roundtrip_val_loss": roundtrip.val_loss,
        "sliding_val_bpb": sliding.val_bpb if sliding else None,
        "sliding_val_loss": sliding.val_loss if sliding else None,
        "scored_tokens": score.scored_tokens, "val_tokens": val_tokens.numel(),
        "bytes_model": bytes_model, "bytes_code": bytes_code, "bytes_total": bytes_total, "fits": fits,
        "steps": steps, "train_time_ms": round(result.train_time_ms, 1),
        "step_avg_ms": round(result.train_time_ms / max(steps, 1), 3), "world_size": rt.world_size,
        "artifact_path": str(artifact_path), "raw_checkpoint_path": str(raw_path),
        "code_sha256": hashlib.sha256(code).hexdigest(),
        "hyperparameters": {**h.as_env(), "RUN_ID": run_id}, "env_overrides": h.overrides(),
        "val_history": result.val_history,
    }
    if rt.master:
        atomic_write_bytes(Path(h.log_dir) / f"{run_id}.json", (json.dumps(summary, indent=2) + "\n").encode())
        log(f"run_complete run_id:{run_id} val_loss:{score.val_loss:.8f} val_bpb:{score.val_bpb:.8f}")
    if rt.distributed:  # tearing down gloo while a peer is still busy can abort the process
        dist.barrier(group=rt.host_group)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
