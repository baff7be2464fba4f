"""What a run does when things go wrong: checks before step 0, stop signals, failures on one rank,
resume, broken models. Real processes (python and torchrun with gloo), real signals, tiny models on
the CPU."""

from __future__ import annotations

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
    assert any(line.startswith("interrupted step:3/") for line in lines)
    assert lines[-1].startswith("error: ")
    assert not (Path(env["ARTIFACT_DIR"]) / "rank1_ckpt.pt").exists()  # a dead peer: weights only
    assert set(torch.load(Path(env["ARTIFACT_DIR"]) / "rank1_raw.pt", weights_only=True)) == set(
        tg.build_model(tg.Hyperparameters.from_env(env), CPU).state_dict()
    )


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
        r"error: (non-finite training loss|weight \S+ (has non-finite values|reaches))", proc.stderr
    ), proc.stderr
    assert not (Path(env["LOG_DIR"]) / "exploded.json").exists()
    assert not any(line.startswith("run_complete") for line in log_lines(env))


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
