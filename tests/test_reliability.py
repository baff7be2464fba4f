"""What a run does when things go wrong: checks before step 0, stop signals, failures on one rank,
resume, broken models. Real processes (python and torchrun with gloo), real signals, tiny models on
the CPU."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import CPU, ROOT, log_events, run_script, tiny_env, write_shard

FAULT_RUNNER = ROOT / "tests" / "fault_runner.py"


def log_lines(env: dict, run_id: str | None = None) -> list[str]:
    return log_events(Path(env["LOG_DIR"]) / f"{run_id or env['RUN_ID']}.txt").splitlines()


def files_of(env: dict) -> list[str]:
    return sorted(
        p.name
        for d in (env["LOG_DIR"], env["ARTIFACT_DIR"])
        if Path(d).is_dir()
        for p in Path(d).iterdir()
    )


def start(env: dict, nproc: int = 1, script: Path = ROOT / "train_gpt.py") -> subprocess.Popen:
    """The run in its own session, so a signal reaches the whole group (as Ctrl-C in a terminal)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full.update(env)
    full.setdefault("OMP_NUM_THREADS", "1")
    cmd = (
        [sys.executable, str(script)]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
        ]
    )
    return subprocess.Popen(
        cmd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=str(ROOT),
    )


def wait_for_line(env: dict, prefix: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(
            line.startswith(prefix) for line in path.read_text(errors="replace").splitlines()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended before {prefix!r}:\n{proc.stdout.read()}\n{proc.stderr.read()}"
            )
        time.sleep(0.02)
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def long_env(tiny_data: dict, tmp_path: Path, **overrides) -> dict:
    """A run long enough to be interrupted: it logs every step."""
    return tiny_env(tiny_data, tmp_path, **{"ITERATIONS": 5000, "TRAIN_LOG_EVERY": 1, **overrides})


# -----------------------------------------------------------------------------
# Stop signals: the weights and a resume checkpoint are written, and both work
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nproc, signum",
    [(1, signal.SIGINT), (1, signal.SIGTERM), (2, signal.SIGINT), (2, signal.SIGTERM)],
)
def test_a_stop_signal_mid_training_keeps_the_weights_and_a_resume_checkpoint(
    tiny_data, tmp_path, nproc, signum
):
    env = long_env(tiny_data, tmp_path, RUN_ID="stopped")
    proc = start(env, nproc)
    wait_for_line(env, "step:3/", proc)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: every process of the group gets it
    else:
        proc.send_signal(signum)  # a scheduler's SIGTERM to the launcher, which passes it on
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out[-2000:] + err[-2000:]
    lines = log_lines(env)
    stopped = next(line for line in lines if line.startswith("interrupted step:"))
    step = int(re.match(r"interrupted step:(\d+)/", stopped)[1])
    assert step >= 3 and f"stopped by {signum.name}" in stopped
    assert lines[-1] == f"error: stopped by {signum.name}"
    assert any(line.startswith("to resume: RESUME_FROM=") for line in lines)
    assert not any(line.startswith("run_complete") for line in lines)

    raw = torch.load(Path(env["ARTIFACT_DIR"]) / "stopped_raw.pt", weights_only=True)
    ckpt = torch.load(Path(env["ARTIFACT_DIR"]) / "stopped_ckpt.pt", weights_only=True)
    assert ckpt["step"] == step and all(torch.equal(raw[k], ckpt["model"][k]) for k in raw)
    muon = next(
        s for s in ckpt["optimizers"] if any("momentum_buffer" in v for v in s["state"].values())
    )
    # every rank's share was gathered
    assert len(muon["state"]) == len(muon["param_groups"][0]["params"])
    if nproc == 2 and signum == signal.SIGTERM:  # the kept weights re-export into a scored artifact
        again = dict(
            env,
            RUN_ID="reexport",
            ITERATIONS="0",
            INIT_CHECKPOINT=str(Path(env["ARTIFACT_DIR"]) / "stopped_raw.pt"),
        )
        run_script(again)
        summary = json.loads((Path(env["LOG_DIR"]) / "reexport.json").read_text())
        assert summary["steps"] == 0 and 0 < summary["val_bpb"] < 20


def children(pid: int) -> list[int]:
    """The processes whose parent is pid, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_ranks_of_a_killed_launcher_stop_as_on_sigterm_and_keep_the_weights(tiny_data, tmp_path):
    env = long_env(tiny_data, tmp_path, RUN_ID="orphans", WARMUP_STEPS=0)
    proc = start(env, nproc=2)
    wait_for_line(env, "step:3/", proc)
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    proc.wait(timeout=10)
    deadline = time.time() + 60
    while any(Path(f"/proc/{r}").exists() for r in ranks) and time.time() < deadline:
        time.sleep(0.1)
    alive = [r for r in ranks if Path(f"/proc/{r}").exists()]
    for r in alive:
        os.kill(r, signal.SIGKILL)
    assert not alive, "the ranks outlived their launcher"
    lines = log_lines(env)
    assert any("stopped by SIGTERM" in line for line in lines if line.startswith("interrupted"))
    assert lines[-1] == "error: stopped by SIGTERM"
    assert (Path(env["ARTIFACT_DIR"]) / "orphans_raw.pt").is_file()


def test_resuming_from_a_stop_ends_with_the_weights_of_an_uninterrupted_run(tiny_data, tmp_path):
    settings = dict(
        ITERATIONS=60, WARMUP_STEPS=2, WARMDOWN_ITERS=20, VAL_LOSS_EVERY=25, FINAL_EVAL=0
    )
    straight = tiny_env(tiny_data, tmp_path, RUN_ID="straight", TRAIN_LOG_EVERY=1, **settings)
    run_script(straight)
    stopped = dict(straight, RUN_ID="stopped")
    proc = start(stopped)
    wait_for_line(stopped, "step:5/", proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    at = int(
        re.match(
            r"interrupted step:(\d+)/",
            next(line for line in log_lines(stopped) if line.startswith("interrupted")),
        )[1]
    )
    assert 5 <= at < 60
    resumed = dict(
        straight,
        RUN_ID="resumed",
        RESUME_FROM=str(Path(straight["ARTIFACT_DIR"]) / "stopped_ckpt.pt"),
    )
    run_script(resumed)
    assert any(
        line.startswith(f"resumed_from:{resumed['RESUME_FROM']} step:{at} ")
        and "warning" not in line
        for line in log_lines(resumed)
    )

    def losses(env):
        return {
            int(m[1]): m[2]
            for m in (re.match(r"step:(\d+)/60 train_loss:(\S+)", line) for line in log_lines(env))
            if m
        }

    after = {s: v for s, v in losses(resumed).items() if s > at}
    # same data
    assert len(after) == 60 - at and after == {s: v for s, v in losses(straight).items() if s > at}
    a = torch.load(Path(straight["ARTIFACT_DIR"]) / "straight_raw.pt", weights_only=True)
    b = torch.load(Path(straight["ARTIFACT_DIR"]) / "resumed_raw.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_periodic_checkpoints_survive_sigkill_and_resume(tiny_data, tmp_path):
    env = long_env(tiny_data, tmp_path, RUN_ID="killed", CHECKPOINT_EVERY_SECONDS=0.3, FINAL_EVAL=0)
    proc = start(env)
    wait_for_line(env, "checkpoint:", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    line = next(line for line in log_lines(env) if line.startswith("checkpoint:"))
    assert "(not counted as training)" in line
    ckpt_path = Path(env["ARTIFACT_DIR"]) / "killed_ckpt.pt"
    at = torch.load(ckpt_path, weights_only=True)["step"]
    resumed = dict(
        env,
        RUN_ID="after_kill",
        RESUME_FROM=str(ckpt_path),
        ITERATIONS=str(at + 3),
        CHECKPOINT_EVERY_SECONDS="0",
    )
    run_script(resumed)
    lines = log_lines(resumed)
    assert any(
        line.startswith(f"resumed_from:{ckpt_path} step:{at} ") and "ITERATIONS" in line
        for line in lines
    )
    assert f"training_done steps:{at + 3} " in "\n".join(lines)


# -----------------------------------------------------------------------------
# Failures after step 0: every rank stops promptly, the weights stay
# -----------------------------------------------------------------------------


def test_an_exception_on_one_rank_stops_both_promptly_and_keeps_the_weights(tiny_data, tmp_path):
    env = long_env(tiny_data, tmp_path, RUN_ID="rank1", FAULT="raise_on_rank:1:4", WARMUP_STEPS=0)
    t0 = time.time()
    proc = run_script(env, nproc=2, check=False, timeout=120, script=FAULT_RUNNER)
    elapsed = time.time() - t0
    assert proc.returncode != 0 and elapsed < 40, (elapsed, proc.stderr[-2000:])
    assert "injected fault on rank 1" in proc.stderr
    lines = log_lines(env)
    assert any(re.match(r"interrupted step:3/\d+ train_time:[1-9]\d*ms", line) for line in lines)
    assert lines[-1].startswith("error: ")
    assert not (Path(env["ARTIFACT_DIR"]) / "rank1_ckpt.pt").exists()  # a dead peer: weights only
    assert set(torch.load(Path(env["ARTIFACT_DIR"]) / "rank1_raw.pt", weights_only=True)) == set(
        tg.build_model(tg.Hyperparameters.from_env(env), CPU).state_dict()
    )


def test_a_frozen_rank_fails_the_run_after_the_collective_timeout_and_the_weights_stay(
    tiny_data, tmp_path
):
    env = long_env(
        tiny_data, tmp_path, RUN_ID="frozen", FAULT="freeze_on_rank:1:4", WARMUP_STEPS=0,
        COLLECTIVE_TIMEOUT_SECONDS=5,
    )  # fmt: skip
    t0 = time.time()
    proc = run_script(env, nproc=2, check=False, timeout=120, script=FAULT_RUNNER)
    assert proc.returncode != 0 and time.time() - t0 < 60, proc.stderr[-2000:]
    lines = log_lines(env)
    assert any(re.match(r"interrupted step:3/\d+ train_time:[1-9]\d*ms", line) for line in lines)
    assert lines[-1].startswith("error: ")
    assert (Path(env["ARTIFACT_DIR"]) / "frozen_raw.pt").is_file()


def test_a_damaged_later_shard_fails_the_run_but_keeps_the_weights(tiny_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(tiny_data["data_path"]) / "fineweb_val_000000.bin", data)
    tokens = np.fromfile(
        Path(tiny_data["data_path"]) / "fineweb_train_000000.bin", dtype="<u2", offset=1024
    )
    write_shard(data / "fineweb_train_000000.bin", tokens[:3000])
    bad = tokens[3000:6000].copy()
    bad[500] = 999  # >= VOCAB_SIZE (384): shards made with another tokenizer
    write_shard(data / "fineweb_train_000001.bin", bad)
    env = long_env(tiny_data, tmp_path, RUN_ID="damaged", DATA_PATH=str(data))
    proc = run_script(env, check=False)
    assert proc.returncode == 1
    assert re.search(
        r"error: .*fineweb_train_000001.bin: token id 999 at position 500 is >= VOCAB_SIZE=384",
        proc.stderr,
    )
    lines = log_lines(env)
    # 3000 tokens = two 1025-token steps
    assert any(line.startswith("interrupted step:2/") for line in lines)
    assert (Path(env["ARTIFACT_DIR"]) / "damaged_raw.pt").exists()


# -----------------------------------------------------------------------------
# Checks before step 0: nothing is created, the RUN_ID stays free
# -----------------------------------------------------------------------------


def refused(env: dict, *needles: str) -> str:
    proc = run_script(env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not (Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.txt").exists()
    return proc.stderr


def test_a_validation_token_id_beyond_the_vocabulary_fails_before_step_0(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["data_path"], data)
    val = np.fromfile(data / "fineweb_val_000000.bin", dtype="<u2", offset=1024).copy()
    val[77] = 384
    write_shard(data / "fineweb_val_000000.bin", val)
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=str(data))
    refused(env, "fineweb_val_000000.bin: token id 384 at position 77 is >= VOCAB_SIZE=384")
    assert files_of(env) == []


def test_an_empty_training_shard_or_a_folder_among_the_shards_is_refused_before_step_0(
    tiny_data, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["data_path"], data)
    write_shard(data / "fineweb_train_000001.bin", np.zeros(0, dtype=np.uint16))
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=str(data), RUN_ID="empty")
    refused(env, "fineweb_train_000001.bin: a training shard with no tokens; remove or rebuild it")
    (data / "fineweb_train_000001.bin").unlink()
    (data / "fineweb_train_000001.bin").mkdir()
    refused(env, "fineweb_train_000001.bin: matches the shard pattern but is not a file")
    assert files_of(env) == []


def test_too_little_space_in_artifact_dir_is_refused_before_step_0(
    tiny_data, tmp_path, monkeypatch
):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="full", CHECKPOINT_EVERY_SECONDS=60)
    h = tg.Hyperparameters.from_env(env)
    files, rt = tg.RunFiles.of(h, "full"), tg.Runtime(0, 0, 1, CPU, False, None)
    params = sum(p.numel() for p in tg.GPT(h).parameters())
    need = 4 * params * 6  # raw weights, artifact, resume checkpoint (weights and optimizers)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tg.shutil, "disk_usage", lambda _: usage._replace(free=need - 1))
    with pytest.raises(ValueError, match=r"^ARTIFACT_DIR=.* MiB free, the run writes up to .* MiB"):
        tg.preflight(h, rt, files)
    monkeypatch.setattr(tg.shutil, "disk_usage", lambda _: usage._replace(free=need))
    assert tg.preflight(h, rt, files).val_tokens.numel() == tiny_data["val_tokens"]
    assert not any(Path(env["LOG_DIR"]).glob("full*"))  # nothing written


def test_a_run_id_too_long_for_a_file_name_is_refused(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="x" * 300)
    refused(
        env, "RUN_ID='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' must be a plain name of at most"
    )


def test_a_run_id_taken_in_the_artifact_folder_only_is_refused(tiny_data, tmp_path):
    first = tiny_env(tiny_data, tmp_path, ITERATIONS=1, LOG_DIR=str(tmp_path / "logs1"))
    run_script(first)
    raw_before = (Path(first["ARTIFACT_DIR"]) / "tiny_raw.pt").read_bytes()
    second = dict(first, LOG_DIR=str(tmp_path / "logs2"))
    refused(second, "RUN_ID=tiny", "tiny_raw.pt already exists")
    assert (Path(first["ARTIFACT_DIR"]) / "tiny_raw.pt").read_bytes() == raw_before
    assert not Path(second["LOG_DIR"]).exists() or list(Path(second["LOG_DIR"]).iterdir()) == []


@pytest.mark.parametrize("run_id", ["../escape", "a/b", ".."])
def test_a_run_id_with_a_path_separator_is_refused(tiny_data, tmp_path, run_id):
    env = tiny_env(tiny_data, tmp_path / "inner", RUN_ID=run_id)
    refused(env, f"RUN_ID={run_id!r} must be a plain name")
    assert not any(tmp_path.rglob("*.txt")) and not any(tmp_path.rglob("*.pt"))


def test_folders_that_cannot_be_written_are_refused_before_step_0(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = tiny_env(tiny_data, tmp_path, ARTIFACT_DIR=str(blocker / "artifacts"))
    refused(env, f"ARTIFACT_DIR={blocker / 'artifacts'} is not a writable folder")
    env = tiny_env(tiny_data, tmp_path, LOG_DIR=str(blocker / "logs"))
    refused(env, f"LOG_DIR={blocker / 'logs'} is not a writable folder")


def test_a_tokenizer_other_than_the_manifests_is_refused_unless_overridden(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["data_path"], data)
    other = tmp_path / "other.model"
    other.write_bytes(b"a different tokenizer")
    (data / "manifest.json").write_text(
        json.dumps({"tokenizer": {"sha256": hashlib.sha256(other.read_bytes()).hexdigest()}})
    )
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=str(data), ITERATIONS=1)
    refused(
        env,
        f"TOKENIZER_PATH={tiny_data['tokenizer_path']}",
        "is not the tokenizer the shards",
        "CHECK_TOKENIZER=0",
    )
    run_script(dict(env, CHECK_TOKENIZER="0"))
    (data / "manifest.json").write_text(
        json.dumps(
            {
                "tokenizer": {
                    "sha256": hashlib.sha256(
                        Path(tiny_data["tokenizer_path"]).read_bytes()
                    ).hexdigest()
                }
            }
        )
    )
    run_script(dict(env, RUN_ID="matching"))


def test_without_a_manifest_a_tokenizer_that_does_not_give_back_the_data_is_refused(
    tiny_data, tmp_path
):
    """Another tokenizer of the same size, trained the same way on a part of the same text: its ids
    are valid, and it decodes the validation documents into other text, which it encodes into ids
    the data does not have."""
    corpus = (Path(tiny_data["tokenizer_path"]).parent / "corpus.txt").read_text(encoding="utf-8")
    (tmp_path / "part.txt").write_text("\n".join(corpus.splitlines()[:300]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "part.txt"), model_prefix=str(tmp_path / "other"), model_type="bpe",
        vocab_size=tiny_data["vocab_size"], byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, character_coverage=0.99, num_threads=1, minloglevel=2,
    )  # fmt: skip
    assert not (Path(tiny_data["data_path"]) / "manifest.json").exists()
    env = tiny_env(tiny_data, tmp_path, TOKENIZER_PATH=str(tmp_path / "other.model"), ITERATIONS=1)
    refused(
        env,
        "gives back the ids of",
        "validation documents: it is not the tokenizer",
        "CHECK_TOKENIZER=0",
    )
    run_script(dict(env, CHECK_TOKENIZER="0"))  # the override scores anyway
    run_script(dict(env, RUN_ID="own", TOKENIZER_PATH=tiny_data["tokenizer_path"]))


def test_a_file_that_is_not_a_sentencepiece_model_is_refused(tiny_data, tmp_path):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"\x00\x01 not a model")
    refused(
        tiny_env(tiny_data, tmp_path, TOKENIZER_PATH=str(bogus)),
        f"TOKENIZER_PATH={bogus} is not a SentencePiece model",
    )


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> dict:
    """One finished tiny run: its raw checkpoint and artifact."""
    root = tmp_path_factory.mktemp("trained")
    env = tiny_env(tiny_data, root, RUN_ID="base", ITERATIONS=2)
    run_script(env)
    return {
        "env": env,
        "raw": Path(env["ARTIFACT_DIR"]) / "base_raw.pt",
        "artifact": Path(env["ARTIFACT_DIR"]) / "base.int6.ptz",
    }


def test_a_checkpoint_of_another_shape_names_the_first_mismatch(tiny_data, tmp_path, trained):
    env = tiny_env(tiny_data, tmp_path, MLP_MULT=3, INIT_CHECKPOINT=str(trained["raw"]))
    refused(
        env,
        f"INIT_CHECKPOINT={trained['raw']}: tensor blocks.0.mlp.fc.weight has shape (128, 64) in "
        "the file, (192, 64) in this model",
    )
    env = tiny_env(tiny_data, tmp_path, NUM_LAYERS=3, INIT_CHECKPOINT=str(trained["raw"]))
    refused(env, "no tensor blocks.2.")
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": [1, 2]}, bogus)
    refused(
        tiny_env(tiny_data, tmp_path, INIT_CHECKPOINT=str(bogus)), "holds no weights of this script"
    )


def test_an_artifact_as_init_checkpoint_loads_its_dequantized_weights(tiny_data, tmp_path, trained):
    env = tiny_env(
        tiny_data,
        tmp_path,
        RUN_ID="from_artifact",
        ITERATIONS=0,
        INIT_CHECKPOINT=str(trained["artifact"]),
    )
    run_script(env)
    assert (
        f"init_checkpoint:{trained['artifact']} kind:artifact (dequantized weights)"
        in log_lines(env)
    )
    raw = torch.load(Path(env["ARTIFACT_DIR"]) / "from_artifact_raw.pt", weights_only=True)
    expected = tg.dequantize_state_dict(tg.read_artifact(trained["artifact"]))
    assert all(torch.equal(raw[k], expected[k]) for k in expected)


def test_resume_from_needs_a_resume_checkpoint(tiny_data, tmp_path, trained):
    refused(
        tiny_env(tiny_data, tmp_path, RESUME_FROM=str(trained["raw"])),
        "is a raw checkpoint: it holds no optimizer state",
        "INIT_CHECKPOINT",
    )


def test_a_failure_before_training_writes_the_error_and_frees_the_run_id(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="early", FAULT="before_training")
    proc = run_script(env, check=False, script=FAULT_RUNNER)
    assert proc.returncode == 1 and "injected failure before training" in proc.stderr
    failed = Path(env["LOG_DIR"]) / "early.failed.txt"
    assert failed.read_text().splitlines()[-1] == "error: injected failure before training"
    assert files_of(env) == ["early.failed.txt"]
    again = run_script(env, check=False, script=FAULT_RUNNER)  # fails the same way once more
    assert again.returncode == 1 and (Path(env["LOG_DIR"]) / "early.failed-1.txt").is_file()
    assert failed.read_text().splitlines()[-1] == "error: injected failure before training"
    run_script(dict(env, ITERATIONS="1"))  # the RUN_ID is free
    assert (Path(env["LOG_DIR"]) / "early.json").exists()


# -----------------------------------------------------------------------------
# A broken model is a failed run
# -----------------------------------------------------------------------------


def test_weights_beyond_the_fp16_range_fail_the_export_naming_the_tensor(
    tiny_data, tmp_path, trained
):
    state = torch.load(trained["raw"], weights_only=True)
    state["tok_emb.weight"][3, 5] = 70000.0  # stored as fp16 (EMBED_QUANT=fp16): would become inf
    big = tmp_path / "big_raw.pt"
    torch.save(state, big)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="big", ITERATIONS=0, INIT_CHECKPOINT=str(big))
    proc = run_script(env, check=False)
    assert proc.returncode == 1
    assert (
        "error: weight tok_emb.weight reaches 7e+04, beyond what its fp16 export holds"
        in proc.stderr
    )
    assert files_of(env) == ["big.txt", "big_raw.pt"]
    assert not any(line.startswith("run_complete") for line in log_lines(env))


def test_exploding_learning_rates_fail_the_run(tiny_data, tmp_path):
    env = tiny_env(
        tiny_data,
        tmp_path,
        RUN_ID="exploded",
        MATRIX_LR=1e6,
        SCALAR_LR=1e6,
        TIED_EMBED_LR=1e6,
        GRAD_CLIP_NORM=0,
        ITERATIONS=8,
    )
    proc = run_script(env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(
        r"error: (non-finite training loss|weight \S+ (has non-finite values|has RMS|reaches))",
        proc.stderr,
    ), proc.stderr
    assert not (Path(env["LOG_DIR"]) / "exploded.json").exists()
    assert not any(line.startswith("run_complete") for line in log_lines(env))


@pytest.mark.parametrize(
    "settings, message",
    [  # finite losses all through: the soft-cap keeps them so
        (
            dict(MATRIX_LR=10, TIED_EMBED_LR=10, SCALAR_LR=10, ITERATIONS=30),
            r"error: the trained model scores val_loss \d+\.\d+, worse than a uniform guess "
            r"\(ln 384 = 5\.9506\): training diverged",
        ),
        (
            dict(MATRIX_LR=1e4, GRAD_CLIP_NORM=0, ITERATIONS=30),
            r"error: weight \S+ has RMS \d+(\.\d+)?(e\+\d+)?, beyond any trained model's \(100\)",
        ),
    ],
)
def test_a_diverged_run_with_finite_losses_is_a_failed_run(tiny_data, tmp_path, settings, message):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="diverged", **settings)
    proc = run_script(env, check=False)
    assert proc.returncode == 1 and re.search(message, proc.stderr), proc.stderr[-3000:]
    assert not (Path(env["LOG_DIR"]) / "diverged.json").exists()
    assert not any(line.startswith("run_complete") for line in log_lines(env))
    assert (Path(env["ARTIFACT_DIR"]) / "diverged_raw.pt").is_file()  # the weights are kept


# -----------------------------------------------------------------------------
# CUDA-path risks, checked on the CPU
# -----------------------------------------------------------------------------


def test_a_failing_gloo_group_falls_back_to_device_agreement_and_the_run_finishes(
    tiny_data, tmp_path
):
    env = tiny_env(
        tiny_data,
        tmp_path,
        RUN_ID="fallback",
        HOST_SYNC="gloo",
        FAULT="gloo_group_fails",
        MAX_WALLCLOCK_SECONDS=60,
    )
    proc = run_script(env, nproc=2, script=FAULT_RUNNER)
    lines = log_lines(env)
    assert any(
        line.startswith(
            "warning: host_sync gloo group failed (RuntimeError: injected gloo failure)"
        )
        for line in lines
    )
    assert any(" host_sync:device " in line for line in lines if line.startswith("run_id:"))
    assert "run_complete run_id:fallback" in proc.stdout


def test_the_projected_fineweb_evaluation_time_is_shown_only_on_cuda(trained):
    lines = log_lines(trained["env"], "base")
    assert not any("projected_fineweb" in line or "evaluation budget" in line for line in lines)


def test_the_records_tools_refuse_a_failed_run(tiny_data, tmp_path):
    logs = tmp_path / "logs"
    good = [
        tiny_env(tiny_data, tmp_path, RUN_ID=f"good{seed}", SEED=seed, ITERATIONS=2)
        for seed in (1, 2)
    ]
    for env in good:
        run_script(env)
    exploded = tiny_env(
        tiny_data, tmp_path, RUN_ID="exploded", SCALAR_LR=1e30, GRAD_CLIP_NORM=0, ITERATIONS=4
    )
    assert run_script(exploded, check=False).returncode == 1
    # A summary from before broken runs failed: a nan score, with the run otherwise complete.
    nan_summary = json.loads((logs / "good1.json").read_text())
    nan_summary.update(run_id="oldnan", val_bpb=float("nan"), val_loss=float("nan"))
    (logs / "oldnan.json").write_text(json.dumps(nan_summary))

    sweep = subprocess.run(
        [sys.executable, str(ROOT / "records" / "make_submission.py"), "sweep", str(logs)],
        capture_output=True,
        text=True,
    )
    assert sweep.returncode == 0, sweep.stderr
    ranked, failed = sweep.stdout.split("failed (not ranked):")
    assert (
        "good1" in ranked
        and "good2" in ranked
        and "exploded" not in ranked
        and "oldnan" not in ranked
    )
    assert (
        "exploded.txt: error: non-finite training loss" in failed
        and "oldnan.json: val_bpb is nan" in failed
    )

    compare = subprocess.run(
        [
            sys.executable,
            str(ROOT / "records" / "make_submission.py"),
            "compare",
            str(logs / "exploded.txt"),
            str(logs / "good1.json"),
            "--reference",
            str(logs / "good1.json"),
            str(logs / "good2.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        compare.returncode != 0
        and "the run failed (error: non-finite training loss" in compare.stderr
    )
    assert "Traceback" not in compare.stderr
    submit = subprocess.run(
        [
            sys.executable,
            str(ROOT / "records" / "make_submission.py"),
            "submit",
            str(logs / "exploded.txt"),
            str(logs / "good1.txt"),
            "--name",
            "x",
            "--author",
            "a",
            "--github-id",
            "a",
            "--blurb",
            "b",
            "--track-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert (
        submit.returncode != 0
        and "the run failed" in submit.stderr
        and "never ranked, compared or submitted" in submit.stderr
    )
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# One RUN_ID, one run; weights that cannot be written where asked go elsewhere
# -----------------------------------------------------------------------------


def test_two_runs_started_together_with_one_run_id_do_not_share_its_files(tiny_data, tmp_path):
    envs = [
        tiny_env(tiny_data, tmp_path, RUN_ID="twin", LOG_DIR=str(tmp_path / f"logs{i}"))
        for i in range(2)
    ]  # one ARTIFACT_DIR
    procs = [start(env) for env in envs]
    outs = [proc.communicate(timeout=120) for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, 1], outs
    loser = outs[codes.index(1)][1]
    assert re.search(
        r"^error: RUN_ID=twin: \S+ (exists, another run holds|already exists)", loser, re.M
    )
    winner = envs[codes.index(0)]
    summary = json.loads((Path(winner["LOG_DIR"]) / "twin.json").read_text())
    assert summary["bytes_model"] == os.path.getsize(summary["artifact_path"])
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == [
        "twin.int6.ptz",
        "twin_raw.pt",
    ]


def test_a_claim_left_by_a_killed_run_is_named(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="held")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "held.claim").touch()
    refused(env, "RUN_ID=held:", "held.claim exists, another run holds this RUN_ID", "delete it")


def test_weights_that_cannot_be_written_to_artifact_dir_go_to_log_dir(
    tiny_data, tmp_path, monkeypatch
):
    real_write = tg.atomic_write_bytes

    def disk_full(path, data):
        if Path(path).parent == tmp_path / "artifacts":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(tg, "atomic_write_bytes", disk_full)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="full")
    with pytest.raises(
        OSError,
        match=r"full_raw.pt could not be written \(No space left on device\); "
        r"the raw weights are in (\S+)",
    ) as caught:
        tg.main(env)
    kept = Path(re.search(r"the raw weights are in (\S+)", str(caught.value)).group(1))
    assert kept.parent == tmp_path / "logs" and set(torch.load(kept, weights_only=True)) == set(
        tg.build_model(tg.Hyperparameters.from_env(env), CPU).state_dict()
    )
    lines = log_lines(env)
    assert lines[-1].startswith("error: ") and str(kept) in lines[-1]


def test_a_stop_signal_after_training_ends_with_an_error_line_and_the_way_to_re_export(
    tiny_data, tmp_path
):
    env = tiny_env(
        tiny_data, tmp_path, RUN_ID="late", TTT_ENABLED=1, TTT_EPOCHS=400, TTT_CHUNK_TOKENS=8192
    )
    proc = start(env)
    wait_for_line(env, "final_int6_roundtrip_exact", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = log_lines(env)
    assert "error: stopped by SIGTERM" in lines[-2], lines[-3:]
    raw = tmp_path / "artifacts" / "late_raw.pt"
    assert lines[-1].startswith(f"to re-export: ITERATIONS=0 INIT_CHECKPOINT={raw} RUN_ID=")
    assert not (tmp_path / "logs" / "late.json").exists()


# -----------------------------------------------------------------------------
# Checkpoints that do not fit the run, and settings that do nothing, are named
# -----------------------------------------------------------------------------


def test_resume_checkpoints_that_do_not_fit_are_refused_and_a_changed_world_size_is_named(
    tiny_data, tmp_path
):
    env = tiny_env(
        tiny_data, tmp_path, RUN_ID="src", ITERATIONS=3, CHECKPOINT_EVERY_SECONDS=0.001,
        FINAL_EVAL=0,
    )  # fmt: skip
    run_script(env)
    ckpt = torch.load(tmp_path / "artifacts" / "src_ckpt.pt", weights_only=True)

    def variant(name: str, drop: str = "", **changes) -> dict:
        path = tmp_path / f"{name}_ckpt.pt"
        torch.save({k: v for k, v in {**ckpt, **changes}.items() if k != drop}, path)
        return dict(
            env, RUN_ID=name, RESUME_FROM=str(path), ITERATIONS="4", CHECKPOINT_EVERY_SECONDS="0"
        )

    refused(variant("no_rng", drop="rng"), "a resume checkpoint without rng")
    one_shard = tmp_path / "one_shard"
    one_shard.mkdir()
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin"):
        shutil.copy(Path(tiny_data["data_path"]) / name, one_shard)
    later = dict(variant("later", loader_position=[1, 0]), DATA_PATH=str(one_shard))
    refused(later, "stopped in training shard 1", "has fewer")
    partial = run_script(variant("partial", optimizers=ckpt["optimizers"][:1]), check=False)
    assert partial.returncode == 1
    assert "holds 1 optimizer states, this run has 3" in log_lines(env, "partial.failed")[-1]
    run_script(variant("moved", world_size=2))
    resumed = next(line for line in log_lines(env, "moved") if line.startswith("resumed_from:"))
    assert "warning: settings differ from the checkpoint's:" in resumed
    assert "WORLD_SIZE (2 then, 1 now)" in resumed


def test_integer_weights_are_refused_and_an_fp16_keep_that_names_nothing_is_warned(
    tiny_data, tmp_path, trained
):
    state = torch.load(trained["raw"], weights_only=True)
    state["blocks.0.attn_scale"] = state["blocks.0.attn_scale"].long()
    ints = tmp_path / "ints_raw.pt"
    torch.save(state, ints)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="ints", INIT_CHECKPOINT=str(ints))
    refused(env, f"INIT_CHECKPOINT={ints}: tensor blocks.0.attn_scale is torch.int64, not weights")
    keep = tiny_env(
        tiny_data, tmp_path, RUN_ID="keep", ITERATIONS=1, FP16_KEEP="tok_emb.*,blocks.99.*"
    )
    run_script(keep)
    warnings = [line for line in log_lines(keep) if line.startswith("warning: FP16_KEEP")]
    assert warnings == ["warning: FP16_KEEP pattern 'blocks.99.*' names no tensor of this model"]


def test_a_full_log_dir_mid_run_is_one_error_naming_the_log_and_the_weights_stay(
    tiny_data, tmp_path, monkeypatch
):
    real_log, full = tg.Logger.__call__, []

    def log(self, msg, *args, **kwargs):
        if full or msg.startswith("step:3/"):
            full.append(msg)
            raise OSError(28, "No space left on device", str(self.path))
        real_log(self, msg, *args, **kwargs)

    monkeypatch.setattr(tg.Logger, "__call__", log)
    env = long_env(tiny_data, tmp_path, RUN_ID="nospace")
    with pytest.raises(OSError, match=r"No space left on device: '.*nospace\.txt'"):
        tg.main(env)
    raw = Path(env["ARTIFACT_DIR"]) / "nospace_raw.pt"
    assert set(torch.load(raw, weights_only=True)) == set(
        tg.build_model(tg.Hyperparameters.from_env(env), CPU).state_dict()
    )
    assert not (Path(env["ARTIFACT_DIR"]) / "nospace.claim").exists()
