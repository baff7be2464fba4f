"""Tiny real runs of train_gpt.py on CPU, for the tests of records/.

`build_tiny_dataset` makes a dataset in the challenge's format from the docstrings of Python's
standard library: a SentencePiece BPE tokenizer with the challenge's settings and shards of
256 int32 header words then uint16 tokens, each document starting with BOS.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

REPO = Path(__file__).resolve().parent.parent
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
BOS_ID = 1
VOCAB_SIZE = 512  # 256 byte-fallback pieces + 4 specials + characters + merges
DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email.message",
               "fractions", "functools", "http.client", "inspect", "itertools", "json", "logging",
               "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics",
               "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
               "urllib.parse", "zipfile")

# Settings of a run that takes a few seconds on one CPU core.
TINY_SETTINGS = {
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "VAL_BATCH_SIZE": "4096",
    "ITERATIONS": "20", "VAL_LOSS_EVERY": "10", "TRAIN_LOG_EVERY": "10", "WARMUP_STEPS": "0",
    "WARMDOWN_ITERS": "5", "MAX_WALLCLOCK_SECONDS": "0", "EVAL_STRIDE": "32", "DEVICE": "cpu",
    "COMPILE": "0", "ZSTD_LEVEL": "3",
}


def stdlib_documents() -> list[str]:
    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and len(doc) > 200 and doc not in docs:
                docs.append(doc)
    return docs


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def build_tiny_dataset(root: Path) -> dict[str, str]:
    """Tokenizer and shards under `root`; returns the settings that point the trainer at them."""
    docs = stdlib_documents()
    lines = [line for doc in docs for line in doc.splitlines() if line.strip()]
    prefix = root / "tiny_bpe"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999, num_threads=1,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    data = root / "data"
    data.mkdir()
    encoded = [np.array([BOS_ID, *sp.encode(doc)]) for doc in docs]
    n_val = len(encoded) // 10  # the first documents are the validation split, as in FineWeb
    write_shard(data / "fineweb_val_000000.bin", np.concatenate(encoded[:n_val]))
    write_shard(data / "fineweb_train_000000.bin", np.concatenate(encoded[n_val:]))
    return {"DATA_PATH": str(data), "TOKENIZER_PATH": f"{prefix}.model",
            "VOCAB_SIZE": str(sp.get_piece_size())}


def run_trainers(workdir: Path, runs: dict[str, dict[str, str]], code: Path,
                 timeout_s: float = 300) -> None:
    """`python3 train_gpt.py` in `workdir` once per RUN_ID in `runs` (with its settings),
    all at once; raises if any fails."""
    procs = {}
    for run_id, settings in runs.items():
        # A clean environment: no stray setting of the caller's leaks into the run.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
               "OMP_NUM_THREADS": "1", **settings, "RUN_ID": run_id}
        procs[run_id] = subprocess.Popen(
            [sys.executable, str(code)], cwd=workdir, env=env, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    failures = []
    for run_id, proc in procs.items():
        _, stderr = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            failures.append(f"{run_id}: exit {proc.returncode}\n{stderr[-2000:]}")
    if failures:
        raise RuntimeError("train_gpt.py failed:\n" + "\n".join(failures))
