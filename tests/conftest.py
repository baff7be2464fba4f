"""Shared fixtures and helpers: a tiny real dataset (SentencePiece + shards), tiny settings and
models, and helpers to run train_gpt.py and read what it writes."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the tools' shared module (shard_format) and the data scripts
sys.path.insert(0, str(ROOT / "data"))

TINY_VOCAB = 384  # 4 specials + 256 byte pieces + characters and merges
# every document starts with it, in the datasets data/ builds and those train_gpt.py reads
BOS_ID = 1
CPU = torch.device("cpu")


def stdlib_documents(limit: int) -> list[str]:
    """Docstrings of standard-library modules in a fixed order: real text, on every machine."""
    import sysconfig

    docs = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
                    if len(docs) >= limit:
                        return docs
    return docs


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def split_tokens(dataset_dir: Path, split: str) -> np.ndarray:
    """The tokens of every shard of a split, in order."""
    from shard_format import read_shard, shard_paths

    return np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(dataset_dir, split)])


def split_documents(tokens: np.ndarray) -> list[list[int]]:
    """Cuts a split's token stream at each BOS; every document must start with one."""
    starts = np.flatnonzero(tokens == BOS_ID)
    assert tokens.size and starts[0] == 0, "a split must begin with BOS"
    ends = list(starts[1:]) + [tokens.size]
    return [tokens[s + 1 : e].tolist() for s, e in zip(starts, ends, strict=True)]


def decoded_document_bytes(sp: spm.SentencePieceProcessor, tokens: np.ndarray) -> int:
    """UTF-8 bytes of every document's text (documents start at BOS) as SentencePiece decodes it."""
    return sum(len(sp.decode(doc).encode("utf-8")) for doc in split_documents(tokens))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """SentencePiece BPE tokenizer with the challenge's settings and train/val shards, all tiny."""
    root = tmp_path_factory.mktemp("tiny_data")
    docs = stdlib_documents(1500)
    text_file = root / "corpus.txt"
    text_file.write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    prefix = root / "tok"
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=TINY_VOCAB,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=0.99,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    streams = [[1] + sp.encode(d) for d in docs]
    val = np.concatenate([np.array(s) for s in streams[:150]])
    train = np.concatenate([np.array(s) for s in streams[150:]])
    data = root / "dataset"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", val)
    half = len(train) // 2
    write_shard(data / "fineweb_train_000000.bin", train[:half])
    write_shard(data / "fineweb_train_000001.bin", train[half:])
    return {
        "data_path": str(data),
        "tokenizer_path": f"{prefix}.model",
        "vocab_size": TINY_VOCAB,
        "val_tokens": len(val),
        "train_tokens": len(train),
    }


@pytest.fixture(scope="module")
def tiny_sp(tiny_data) -> spm.SentencePieceProcessor:
    """The tiny dataset's tokenizer."""
    return spm.SentencePieceProcessor(model_file=tiny_data["tokenizer_path"])


@pytest.fixture(scope="module")
def luts(tiny_sp, tiny_data):
    """train_gpt.py's byte-counting tables of the tiny tokenizer."""
    import train_gpt

    return train_gpt.build_byte_luts(tiny_sp, tiny_data["vocab_size"])


@pytest.fixture(scope="module")
def val_tokens(tiny_data) -> torch.Tensor:
    """The tiny validation split, as train_gpt.py loads it."""
    import train_gpt

    return train_gpt.load_validation_tokens(
        os.path.join(tiny_data["data_path"], "fineweb_val_*.bin"), 1
    )


def tiny_env(tiny_data: dict, tmp_path: Path, **overrides) -> dict:
    """Settings of a tiny model that trains in seconds on a CPU."""
    env = {
        "DATA_PATH": tiny_data["data_path"],
        "TOKENIZER_PATH": tiny_data["tokenizer_path"],
        "VOCAB_SIZE": str(tiny_data["vocab_size"]),
        "LOG_DIR": str(tmp_path / "logs"),
        "ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DEVICE": "cpu",
        "NUM_LAYERS": "2",
        "MODEL_DIM": "64",
        "NUM_HEADS": "4",
        "NUM_KV_HEADS": "2",
        "MLP_MULT": "2",
        "TRAIN_SEQ_LEN": "64",
        "TRAIN_BATCH_TOKENS": "1024",
        "VAL_BATCH_SIZE": "8192",
        "ITERATIONS": "6",
        "WARMUP_STEPS": "0",
        "WARMDOWN_ITERS": "0",
        "VAL_LOSS_EVERY": "0",
        "TRAIN_LOG_EVERY": "1",
        "MAX_WALLCLOCK_SECONDS": "0",
        "EVAL_STRIDE": "0",
        "ZSTD_LEVEL": "3",
        "RUN_ID": "tiny",
        "SEED": "1",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(
    env: dict,
    nproc: int = 1,
    timeout: int = 300,
    check: bool = True,
    script: Path = ROOT / "train_gpt.py",
) -> subprocess.CompletedProcess:
    """Run train_gpt.py as a user would: python for one process, torchrun (gloo) for several."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    full_env.update(env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
        ]
    proc = subprocess.run(
        cmd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=env.get("RUN_CWD", str(ROOT)),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train_gpt.py failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def log_events(path: Path) -> str:
    """A run's log without the copy of the source code at its top: the lines the run wrote."""
    return Path(path).read_bytes().split(b"\ncode_end\n", 1)[1].decode("utf-8")


# What importing a train_gpt.py does, run as `python -c IMPORT_PROBE FOLDER` (the folder holding
# it): the environment variables it reads, whether it starts a process group or CUDA, its public
# names, and (through an audit hook) the source a packed file compiles, the code it executes, the
# files it opens and any socket it touches. Prints one JSON line.
IMPORT_PROBE = r"""
import json, os, sys
import numpy, sentencepiece, zstandard, torch
import torch.distributed as dist, torch.nn.functional, torch.nn.parallel

events = {"compile": [], "exec": [], "open": [], "socket": []}
def audit(event, args):
    if event == "compile" and args[1] == "<unpacked train_gpt.py>":
        events["compile"].append(args[0] if isinstance(args[0], str) else args[0].decode("utf-8"))
    elif event == "exec":
        events["exec"].append(args[0].co_filename)
    elif event == "open" and isinstance(args[0], str):
        events["open"].append(os.path.abspath(args[0]))
    elif event.startswith("socket."):
        events["socket"].append(event)
sys.addaudithook(audit)

class RecordingEnviron(dict):
    reads = []
    def __getitem__(self, key): self.reads.append(key); return super().__getitem__(key)
    def get(self, key, default=None): self.reads.append(key); return super().get(key, default)
    def __contains__(self, key): self.reads.append(key); return super().__contains__(key)
    def __iter__(self): self.reads.append("<iter>"); return super().__iter__()
    def items(self): self.reads.append("<items>"); return super().items()
    def keys(self): self.reads.append("<keys>"); return super().keys()
    def copy(self): self.reads.append("<copy>"); return super().copy()

real_environ = os.environ
os.environ = RecordingEnviron(real_environ)
sys.path.insert(0, sys.argv[1])
import train_gpt
reads, os.environ = os.environ.reads, real_environ
print(json.dumps({"reads": reads, "dist": dist.is_initialized(),
                  "cuda": torch.cuda.is_initialized(),
                  "has_main": callable(getattr(train_gpt, "main", None)),
                  "names": sorted(n for n in vars(train_gpt) if not n.startswith("_")), **events}))
"""


def small_hparams(num_layers: int = 3, **overrides):
    """Validated tiny settings for unit tests: vocab 64, width 32, 4 heads of 8 on 2 KV heads."""
    import train_gpt

    settings = dict(
        vocab_size=64, num_layers=num_layers, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2
    )
    h = train_gpt.Hyperparameters(**{**settings, **overrides})
    h.validate()
    return h


def randomized(
    module: torch.nn.Module, seed: int = 0, std: float = 0.3, dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    """The module in `dtype` (float64 unless told) with random values added to every parameter: the
    zero-initialized projections would otherwise hide every block."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module.to(dtype)


def random_gpt(h) -> torch.nn.Module:
    """A GPT in float64 (its initialization seeded) with every parameter perturbed, so each position
    depends on its whole context (at init the zero-initialized projections make it depend on the
    current token only)."""
    import train_gpt

    torch.manual_seed(0)
    return randomized(train_gpt.GPT(h).double(), seed=1)


class ShapeRecorder(torch.nn.Module):
    """The model, recording each call: (gradients enabled, shape of x, shape of y, score_last)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, y, **kwargs):
        self.calls.append(
            (torch.is_grad_enabled(), tuple(x.shape), tuple(y.shape), kwargs["score_last"])
        )
        return self.model(x, y, **kwargs)


def assert_causal(model: torch.nn.Module, ids: torch.Tensor, vocab: int = 64) -> None:
    """Changing the token at position t leaves every output before t exactly as it was, and changes
    one at t or later."""
    base = model(ids)
    for t in range(ids.shape[1]):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % vocab
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.equal(out[:, t:], base[:, t:])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared machine: one thread is many times faster than several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
