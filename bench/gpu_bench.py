"""Every GPU figure from one command (throughput, a short real run, a peer) into bench/results/.

    python bench/gpu_bench.py --only throughput  # the defaults at 524,288 tokens/step
    python bench/gpu_bench.py --only throughput --presets frontier,pr65 --no-default
    python bench/gpu_bench.py --only throughput --presets frontier --doc-attention  # 0 vs 1
    python bench/gpu_bench.py --only run --minutes 3  # short real run with the final evaluation
    python bench/gpu_bench.py --only peer --peer ../peer/train_gpt.py --minutes 3
    python bench/gpu_bench.py --dry-run --peer train_gpt.py  # same harness on CPU, tiny settings

Parts and their GPU time on one H100 (estimates: nothing here has run on a GPU yet):
  throughput  per configuration: ~20 s start-up, ~1-2 min compile in the warm-up (WARMUP_STEPS=20),
              then 10 settling + --steps timed steps (default 60) at roughly 350 ms/step = ~25 s;
              ~2-3 min in all. Figures: ms/step, tokens/s, MFU, peak memory, warm-up (compile) time.
              --doc-attention measures each configuration twice, DOC_ATTENTION=0 and =1.
  run         --minutes of training (default 3) + ~2-3 min for compile, export (zstd-22) and the
              three final evaluations; ~5-6 min. Figures: pre-quant, round-trip and sliding val_bpb,
              quant penalty, artifact bytes, export time, sliding scored tokens/s, projected 8-GPU
              FineWeb evaluation time, data epochs, steps, ms/step.
  peer        --peer PATH (the challenge's baseline or a record's script) through its own
              environment variables, same data, same minutes: --minutes + ~1-2 min; ~4-5 min.
Each part fits one 10-minute command; run them as separate invocations when commands are
time-limited. Planning: throughput + run + peer at --minutes 3 is ~12-14 min of GPU time, plus under
a minute to build the offline dataset if it is missing; with less time, drop the peer or lower
--minutes. Every part is killed at --part-timeout-min (default 9) and recorded as timed out with
what it logged. The exit status is 2 when a part failed (its error is recorded with it), 0 when all
succeeded.

Figures of every invocation are appended to bench/results/<date>_<device>.json (earlier ones are
kept) and bench/RESULTS.md is regenerated from all result files. KEY=VALUE arguments (or --env
KEY=VALUE) are train_gpt.py settings passed to the throughput and run parts; a key that is not a
setting of train_gpt.py, or a configuration the trainer rejects, is recorded as failed with its
error. Process variables (OMP_NUM_THREADS, NCCL_*, ...) are taken from the environment the harness
runs in.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402
from runlog import ROOT, TRAINER, display  # noqa: E402

RESULTS_FORMAT = "pgolf-gpu-bench"
PARTS = ("throughput", "run", "peer")
BATCH_TOKENS = 524_288  # the challenge's global batch: 8 GPUs x 64 sequences x 1024 tokens
GRAD_ACCUM_TOTAL = 8  # micro-steps per step on one GPU; N GPUs take 8/N each
# what data/build_dataset.py builds by default
OFFLINE_DATASET = ("pydocs_sp1024", "pydocs_1024_bpe.model", 1024)
# a model that trains in seconds on a CPU, read by train_gpt.py and the baseline alike
DRY_RUN_SETTINGS = {
    "DEVICE": "cpu",
    "NUM_LAYERS": "2",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "64",
    "VAL_BATCH_SIZE": "8192",
    "EVAL_STRIDE": "32",
    "ZSTD_LEVEL": "3",
    "WARMUP_STEPS": "2",
}
DRY_RUN_BATCH_TOKENS = 4096  # 8 micro-steps of 8 sequences of 64 tokens
DRY_RUN_DEFAULTS = {"minutes": 0.05, "steps": 6, "settle_steps": 2}
PART_FAILED_STATUS = 2  # exit status when a part failed (its error is in the results)
GPU_DEFAULTS = {"minutes": 3.0, "steps": 60, "settle_steps": runlog.STEADY_FROM_STEP}
MEASURED_NOTE = (
    "Measured: every figure except the projected 8-GPU evaluation time, which scales the measured "
    "sliding-window rate of one device to 8 devices over the 63,779,840-token FineWeb validation "
    "split. MFU is model FLOPs (6 N + 12 L d T per token) over the device's nominal dense bf16 "
    "peak. Step time is the steady state between two logged steps (compilation and the first 10 "
    "steps excluded). Scores on a dataset that is not FineWeb are checks of the pipeline, not "
    "challenge scores."
)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "assignments",
        nargs="*",
        metavar="KEY=VALUE",
        help="train_gpt.py settings for throughput and run",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="same as a KEY=VALUE argument",
    )
    p.add_argument(
        "--only",
        help="comma-separated parts to run: throughput, run, peer (default: all; peer only "
        "with --peer)",
    )
    p.add_argument(
        "--presets", default="", help="comma-separated PRESET values measured for throughput too"
    )
    p.add_argument(
        "--no-default", action="store_true", help="throughput: skip the default configuration"
    )
    p.add_argument(
        "--doc-attention",
        action="store_true",
        help="throughput: each configuration with DOC_ATTENTION=0 and with DOC_ATTENTION=1",
    )
    p.add_argument(
        "--minutes", type=float, help="training minutes of the run and peer parts (default 3)"
    )
    p.add_argument(
        "--steps", type=int, help="timed throughput steps after warm-up and settling (default 60)"
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="GPUs (processes); must divide 8 (default 1)"
    )
    p.add_argument(
        "--peer", type=Path, help="a peer train_gpt.py run through its own environment variables"
    )
    p.add_argument(
        "--peer-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variables for the peer only",
    )
    p.add_argument(
        "--data-path", type=Path, help="shard folder (default: DATA_PATH, else the offline dataset)"
    )
    p.add_argument(
        "--tokenizer-path", type=Path, help="SentencePiece model (default: TOKENIZER_PATH)"
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default: VOCAB_SIZE)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=ROOT / "data",
        help="where the offline dataset is, or is built if missing (default: data/)",
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        help="holds results/*.json and RESULTS.md (default: bench/, "
        "with --dry-run bench/out/dry-run/)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "bench" / "out",
        help="logs, artifacts and peer folders (default: bench/out/)",
    )
    p.add_argument(
        "--part-timeout-min",
        type=float,
        default=9.0,
        help="kill a part after this long (default 9)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model: about 2 minutes in all")
    p.add_argument(
        "--render", action="store_true", help="only regenerate RESULTS.md from the result files"
    )
    args = p.parse_args(argv)
    defaults = DRY_RUN_DEFAULTS if args.dry_run else GPU_DEFAULTS
    args.minutes = defaults["minutes"] if args.minutes is None else args.minutes
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.settle_steps = defaults["settle_steps"]
    args.results_dir = args.results_dir or ROOT / "bench" / ("out/dry-run" if args.dry_run else "")
    args.parts = parse_parts(args)
    args.env = runlog.parse_assignments(args.assignments + args.env, "KEY=VALUE / --env")
    args.peer_env = runlog.parse_assignments(args.peer_env, "--peer-env")
    args.presets = [x for x in args.presets.split(",") if x.strip()]
    check_args(args)
    return args


def parse_parts(args) -> list[str]:
    if args.only is None:
        return ["throughput", "run"] + (["peer"] if args.peer else [])
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        raise SystemExit(f"error: --only {args.only}: parts are {', '.join(PARTS)}")
    return [x for x in PARTS if x in parts]


def check_args(args) -> None:
    if args.nproc < 1 or GRAD_ACCUM_TOTAL % args.nproc:
        raise SystemExit(
            f"error: --nproc {args.nproc} must divide {GRAD_ACCUM_TOTAL} (1, 2, 4 or 8)"
        )
    if args.minutes <= 0 or args.steps < 2 or args.part_timeout_min <= 0:
        raise SystemExit(
            "error: --minutes and --part-timeout-min must be positive and --steps at least 2"
        )
    if "peer" in args.parts and args.peer is None:
        raise SystemExit("error: --only peer needs --peer PATH (a train_gpt.py to compare with)")
    if args.peer is not None and not args.peer.is_file():
        raise SystemExit(
            f"error: --peer {args.peer} is not a file; give the path of the peer's train_gpt.py"
        )
    if "throughput" in args.parts and args.no_default and not args.presets:
        raise SystemExit("error: --no-default leaves no throughput configuration; add --presets")


def require_zstandard() -> None:
    if importlib.util.find_spec("zstandard") is None:
        raise SystemExit(f"error: {runlog.ZSTANDARD_HELP}")


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------


def resolve_data(args) -> tuple[dict, dict]:
    """(description, trainer env) of the data: DATA_PATH/TOKENIZER_PATH/VOCAB_SIZE from the flags or
    the environment, else the offline dataset (built if missing)."""
    data_path = args.data_path or os.environ.get("DATA_PATH")
    tokenizer_path = args.tokenizer_path or os.environ.get("TOKENIZER_PATH")
    vocab_size = args.vocab_size or os.environ.get("VOCAB_SIZE")
    if data_path is None:
        name, tokenizer, vocab_size = OFFLINE_DATASET
        data_path = args.data_root / "datasets" / name
        tokenizer_path = args.data_root / "tokenizers" / tokenizer
        if not (data_path / "fineweb_val_000000.bin").is_file():
            build_offline_dataset(args.data_root)
    elif tokenizer_path is None or vocab_size is None:
        raise SystemExit(
            "error: --data-path (or DATA_PATH) needs --tokenizer-path and --vocab-size too "
            "(or TOKENIZER_PATH and VOCAB_SIZE)"
        )
    data_path, tokenizer_path = Path(data_path).resolve(), Path(tokenizer_path).resolve()
    if not tokenizer_path.is_file():
        raise SystemExit(f"error: tokenizer {tokenizer_path} does not exist; give --tokenizer-path")
    if not str(vocab_size).isdigit():
        raise SystemExit(
            f"error: VOCAB_SIZE={vocab_size!r} is not a whole number; give --vocab-size"
        )
    env = {
        "DATA_PATH": str(data_path),
        "TOKENIZER_PATH": str(tokenizer_path),
        "VOCAB_SIZE": str(vocab_size),
    }
    return runlog.describe_data(data_path, tokenizer_path, int(vocab_size)), env


def build_offline_dataset(data_root: Path) -> None:
    print(
        f"building the offline dataset under {display(data_root)} (data/build_dataset.py, about a "
        "minute at most)",
        flush=True,
    )
    command = [
        sys.executable,
        str(ROOT / "data" / "build_dataset.py"),
        "--out-root",
        str(data_root),
    ]
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(
            "error: data/build_dataset.py failed (its message is above); build the dataset by hand "
            "or give --data-path"
        )


# -----------------------------------------------------------------------------
# The parts
# -----------------------------------------------------------------------------


class Bench:
    """One invocation: its settings, where its runs write, and what each run's log yields."""

    def __init__(self, args, data: dict, data_env: dict, invocation_id: str):
        self.args, self.data, self.data_env, self.invocation_id = (
            args,
            data,
            data_env,
            invocation_id,
        )
        self.known_settings: dict = {}  # train_gpt.py's settings, once a run has logged them

    def our_env(self, part_env: dict) -> dict:
        batch = DRY_RUN_BATCH_TOKENS if self.args.dry_run else BATCH_TOKENS
        env = {
            "TRAIN_BATCH_TOKENS": str(batch),
            "GRAD_ACCUM_STEPS": str(GRAD_ACCUM_TOTAL // self.args.nproc),
        }
        env.update(DRY_RUN_SETTINGS if self.args.dry_run else {})
        env.update(part_env)
        env.update(self.args.env)
        return env

    def label(self, base: str) -> str:
        """A configuration: the defaults or a preset, plus the settings on the command line."""
        return " ".join([base] + [f"{k}={v}" for k, v in sorted(self.args.env.items())])

    def throughput_configs(self) -> list[tuple[str, dict]]:
        configs = [] if self.args.no_default else [(self.label("default"), {})]
        configs += [(self.label(f"PRESET={p}"), {"PRESET": p}) for p in self.args.presets]
        if not self.args.doc_attention:
            return configs
        flags = ("0", "1")
        return [
            (f"{lb} DOC_ATTENTION={f}", e | {"DOC_ATTENTION": f})
            for lb, e in configs
            for f in flags
        ]

    def measurements(self):
        """Each part's measurement as soon as it is taken, in order."""
        if "throughput" in self.args.parts:
            for label, config_env in self.throughput_configs():
                yield self.throughput(label, config_env)
        if "run" in self.args.parts:
            yield self.short_run()
        if "peer" in self.args.parts:
            yield self.peer()

    def throughput(self, label: str, config_env: dict) -> dict:
        env = self.our_env(
            {
                "FINAL_EVAL": "0",
                "VAL_LOSS_EVERY": "0",
                "MAX_WALLCLOCK_SECONDS": "0",
                "ITERATIONS": str(self.args.settle_steps + self.args.steps),
                "TRAIN_LOG_EVERY": str(self.args.settle_steps),
            }
        )
        env.update(config_env)
        return self.run_ours("throughput", label, env)

    def short_run(self) -> dict:
        env = self.our_env(
            {
                "MAX_WALLCLOCK_SECONDS": f"{60 * self.args.minutes:g}",
                "VAL_LOSS_EVERY": "0",
                "TRAIN_LOG_EVERY": "5" if self.args.dry_run else "50",
                "FINAL_EVAL": "1",
            }
        )
        return self.run_ours("run", self.label("default"), env)

    def run_ours(self, part: str, label: str, env: dict) -> dict:
        run_id = self.run_id(part, label)
        work = self.args.work_dir
        env = {
            **env,
            **self.data_env,
            "RUN_ID": run_id,
            "LOG_DIR": str(work / "logs"),
            "ARTIFACT_DIR": str(work / "artifacts"),
        }
        if error := runlog.unread_settings_error(self.setting_keys(env), self.known_settings):
            # known before spending device time on it
            return self.measurement(part, label, env, error=error)
        outcome, log = self.execute(
            runlog.trainer_command(TRAINER, self.args.nproc),
            env,
            cwd=ROOT,
            log_file=work / "logs" / f"{run_id}.txt",
            run_id=run_id,
        )
        self.known_settings = self.known_settings or log.settings
        error = runlog.failure_reason(outcome, log, self.timeout_s) or runlog.unread_settings_error(
            self.setting_keys(env), log.settings
        )
        return self.measurement(part, label, env, outcome=outcome, log=log, error=error)

    def peer(self) -> dict:
        """The peer in its own folder (it writes logs/ and its model files where it runs)."""
        run_id = self.run_id("peer", "peer")
        cwd = self.args.work_dir / "peer" / run_id
        batch = DRY_RUN_BATCH_TOKENS if self.args.dry_run else BATCH_TOKENS
        env = {
            **(DRY_RUN_SETTINGS if self.args.dry_run else {}),
            **self.data_env,
            "RUN_ID": run_id,
            "ITERATIONS": "20000",
            "MAX_WALLCLOCK_SECONDS": f"{60 * self.args.minutes:g}",
            "VAL_LOSS_EVERY": "0",
            "TRAIN_LOG_EVERY": "5" if self.args.dry_run else "50",
            "TRAIN_BATCH_TOKENS": str(batch),
            "WARMUP_STEPS": DRY_RUN_SETTINGS["WARMUP_STEPS"] if self.args.dry_run else "20",
            **self.args.peer_env,
        }
        script = self.args.peer.resolve()
        outcome, log = self.execute(
            runlog.trainer_command(script, self.args.nproc),
            env,
            cwd=cwd,
            log_file=cwd / "logs" / f"{run_id}.txt",
            run_id=run_id,
        )
        label = f"{display(script)} (sha256 {sha256_file(script)[:12]})"
        return self.measurement(
            "peer",
            label,
            env,
            outcome=outcome,
            log=log,
            error=runlog.failure_reason(outcome, log, self.timeout_s),
        )

    @property
    def timeout_s(self) -> float:
        return 60 * self.args.part_timeout_min

    def execute(self, command: list[str], env: dict, *, cwd: Path, log_file: Path, run_id: str):
        transcript = self.args.work_dir / "transcripts" / f"{run_id}.out"
        print(
            f"running {run_id}: {shlex.join(f'{k}={v}' for k, v in sorted(env.items()))} "
            f"{shlex.join(command[1:])} (output: {display(transcript)})",
            flush=True,
        )
        outcome = runlog.run_trainer(
            command, env, cwd=cwd, transcript_path=transcript, timeout_s=self.timeout_s
        )
        return outcome, runlog.parse_log(outcome.transcript, log_file)

    def setting_keys(self, env: dict) -> list[str]:
        """The keys the user chose (the harness's own keys are settings by construction)."""
        return sorted(set(self.args.env) | ({"PRESET"} if "PRESET" in env else set()))

    def run_id(self, part: str, label: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        return f"bench-{part}-{slug}-{self.invocation_id}"

    def measurement(
        self, part: str, label: str, env: dict, *, outcome=None, log=None, error=None
    ) -> dict:
        log = log or runlog.TrainerLog()
        shown_env = {
            k: v
            for k, v in env.items()
            if k not in ("DATA_PATH", "TOKENIZER_PATH", "LOG_DIR", "ARTIFACT_DIR", "RUN_ID")
        }
        return {
            "invocation": self.invocation_id,
            "part": part,
            "config": label,
            "status": "failed" if error else "ok",
            "error": error,
            "run_id": env.get("RUN_ID"),
            "env": shown_env,
            "minutes": None if part == "throughput" else self.args.minutes,
            "wall_s": round(outcome.wall_s, 1) if outcome else None,
            "figures": figures(log, env, self.args, self.data),
        }


def figures(log: runlog.TrainerLog, env: dict, args, data: dict) -> dict:
    """The same figures for every part and both scripts; None where the run did not log them."""
    batch_tokens = int(env.get("TRAIN_BATCH_TOKENS", BATCH_TOKENS))
    world_size = int(log.header.get("world_size", args.nproc))
    steady = runlog.steady_step_ms(log.step_times, args.settle_steps)
    ms_per_step, timed_steps = steady if steady else (None, None)
    tokens_per_s = batch_tokens / ms_per_step * 1000 if ms_per_step else None
    flops_per_token = runlog.number(log.model.get("flops_per_token"))
    peak_flops = runlog.number(log.model.get("peak_flops_per_device"))
    mfu = (
        flops_per_token * tokens_per_s / (peak_flops * world_size)
        if tokens_per_s and flops_per_token and peak_flops
        else None
    )
    data_epochs = log.data_epochs
    # the baseline does not log it; it follows from the batch
    if data_epochs is None and log.steps is not None:
        data_epochs = log.steps * batch_tokens / data["train_tokens"]
    return {
        "ms_per_step": ms_per_step,
        "timed_steps": timed_steps,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "warmup_ms": log.warmup_ms,
        "peak_allocated_mib": log.peak_allocated_mib,
        "peak_reserved_mib": log.peak_reserved_mib,
        "peak_rss_mib": log.peak_rss_mib,
        "steps": log.steps,
        "train_time_ms": log.train_time_ms,
        "data_epochs": data_epochs,
        "prequant_val_bpb": log.prequant_val_bpb,
        "roundtrip_val_bpb": log.roundtrip_val_bpb,
        "sliding_val_bpb": log.sliding_val_bpb,
        "final_val_bpb": log.final_val_bpb,
        "quant_penalty_bpb": log.quant_penalty_bpb,
        "bytes_total": log.bytes_total,
        "artifact_format": log.artifact_format,
        "export_ms": log.export_ms,
        "roundtrip_eval_ms": log.roundtrip_eval_ms,
        "sliding_eval_ms": log.sliding_eval_ms,
        "roundtrip_graphs": log.roundtrip_graphs,
        "roundtrip_compile_ms": log.roundtrip_compile_ms,
        "sliding_graphs": log.sliding_graphs,
        "sliding_compile_ms": log.sliding_compile_ms,
        "sliding_tok_s": log.sliding_tok_s,
        "projected_fineweb_8gpu_s": log.projected_fineweb_8gpu_s,
        "attention": log.header.get("attention"),
        "compile": log.header.get("compile"),
        "host_sync": log.header.get("host_sync"),
        "world_size": world_size,
        "batch_tokens": batch_tokens,
    }


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# Results: merged per date and device, RESULTS.md over all of them
# -----------------------------------------------------------------------------


def results_path(results_dir: Path, machine: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", machine["device"].lower()).strip("-")
    return results_dir / "results" / f"{datetime.date.today().isoformat()}_{slug}.json"


@contextlib.contextmanager
def locked(folder: Path):
    """Two invocations writing the same results file take turns (read, append, write)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def append_measurement(path: Path, invocation: dict, measurement: dict | None) -> None:
    """Add the invocation (once) and a measurement to the file; everything already there stays."""
    with locked(path.parent):
        results = runlog.read_json(path, RESULTS_FORMAT) or {
            "format": RESULTS_FORMAT,
            "version": 1,
            "invocations": [],
            "measurements": [],
        }
        if not any(i["id"] == invocation["id"] for i in results["invocations"]):
            results["invocations"].append(invocation)
        if measurement is not None:
            results["measurements"].append(measurement)
        runlog.write_text_atomic(path, json.dumps(results, indent=2) + "\n")


def load_all_results(results_dir: Path) -> list[tuple[Path, dict]]:
    return [
        (p, runlog.read_json(p, RESULTS_FORMAT))
        for p in sorted((results_dir / "results").glob("*.json"))
    ]


def fmt(value, spec: str = ",.0f", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def memory_cell(f: dict) -> str:
    if f["peak_allocated_mib"] is not None:
        return f"{f['peak_allocated_mib']:,.0f} alloc / {f['peak_reserved_mib']:,.0f} res MiB"
    return fmt(f["peak_rss_mib"], ",.0f", " MiB RSS")


def runtime_cell(f: dict) -> str:
    if f["attention"] is None:
        return "—"
    sync = f", host sync {f['host_sync']}" if f["world_size"] > 1 and f["host_sync"] else ""
    return f"{f['attention']}, {'compiled' if f['compile'] == '1' else 'eager'}{sync}"


def eval_compile_cell(f: dict) -> str:
    if f["roundtrip_graphs"] is None:
        return "—"
    seconds = [(x or 0) / 1000 for x in (f["roundtrip_compile_ms"], f["sliding_compile_ms"])]
    return (
        f"{f['roundtrip_graphs']} + {fmt(f['sliding_graphs'], 'd')} graphs, "
        f"{seconds[0]:.1f} + {seconds[1]:.1f} s"
    )


def projection_cell(f: dict, machine: dict) -> str:
    if f["projected_fineweb_8gpu_s"] is not None:
        return f"{f['projected_fineweb_8gpu_s']:.1f} s"
    return (
        "not projected (CPU)"
        if not machine["gpu_count"] and f["sliding_val_bpb"] is not None
        else "—"
    )


def peer_ratios(peer: dict, measurements: list[dict]) -> str:
    """ours/peer from the latest successful run part on the same minutes (same results file)."""
    ours = [
        m
        for m in measurements
        if m["part"] == "run" and m["status"] == "ok" and m["minutes"] == peer["minutes"]
    ]
    if peer["status"] != "ok" or not ours:
        return "—"
    a, b = ours[-1]["figures"], peer["figures"]
    parts = [
        (name, a[key], b[key])
        for name, key in (
            ("ms/step", "ms_per_step"),
            ("val_bpb", "final_val_bpb"),
            ("bytes", "bytes_total"),
        )
    ]
    return " · ".join(f"{name} {x / y:.3f}" if x and y else f"{name} —" for name, x, y in parts)


RESULTS_COLUMNS = (
    "date",
    "machine",
    "versions",
    "checkout",
    "command",
    "data",
    "part",
    "config",
    "status",
    "attention, compile",
    "ms/step",
    "tokens/s",
    "MFU",
    "peak memory",
    "warm-up (compile)",
    "steps",
    "data epochs",
    "pre-quant val_bpb",
    "round-trip val_bpb",
    "sliding val_bpb",
    "quant penalty",
    "artifact bytes",
    "export",
    "sliding scored tok/s",
    "eval graphs, compile (round trip + sliding)",
    "8-GPU FineWeb eval (projected)",
    "ours/peer",
)


def results_row(path: Path, inv: dict, m: dict, measurements: list[dict]) -> list[str]:
    f, machine = m["figures"], inv["machine"]
    count = f"{machine['gpu_count']}× " if machine["gpu_count"] > 1 else ""
    driver = f", driver {machine['driver']}" if machine["driver"] else ""
    checkout = inv["checkout"]
    commit = (
        f"{checkout['commit'][:10]}{' (dirty)' if checkout['dirty'] else ''}"
        if checkout["commit"]
        else "—"
    )
    status = m["status"] if not m["error"] else f"{m['status']}: {m['error']}"
    return [
        path.stem.split("_")[0],
        f"{count}{machine['device']}{driver}",
        f"torch {machine['torch']}, CUDA {machine['cuda'] or '—'}, Python {machine['python']}",
        commit,
        f"`{inv['command']}`" + (" (dry run)" if inv["dry_run"] else ""),
        f"{inv['data']['name']}" + ("" if inv["data"]["fineweb"] else " (not FineWeb)"),
        m["part"],
        m["config"],
        status,
        runtime_cell(f),
        fmt(f["ms_per_step"], ",.1f"),
        fmt(f["tokens_per_s"]),
        fmt(None if f["mfu"] is None else 100 * f["mfu"], ".1f", "%"),
        memory_cell(f),
        fmt(None if f["warmup_ms"] is None else f["warmup_ms"] / 1000, ",.1f", " s"),
        fmt(f["steps"]),
        fmt(f["data_epochs"], ".2f"),
        fmt(f["prequant_val_bpb"], ".4f"),
        fmt(f["roundtrip_val_bpb"], ".4f"),
        fmt(f["sliding_val_bpb"], ".4f"),
        fmt(f["quant_penalty_bpb"], "+.4f"),
        fmt(f["bytes_total"]),
        fmt(None if f["export_ms"] is None else f["export_ms"] / 1000, ".1f", " s"),
        fmt(f["sliding_tok_s"]),
        eval_compile_cell(f),
        projection_cell(f, machine),
        peer_ratios(m, measurements) if m["part"] == "peer" else "—",
    ]


def render_results(results_dir: Path) -> str:
    files = load_all_results(results_dir)
    lines = [
        "# GPU bench results",
        "",
        "Regenerated by `python bench/gpu_bench.py` from every `results/*.json` beside this file; "
        "do not edit by hand. `python bench/gpu_bench.py --help` lists the parts and their GPU "
        "time.",
        "",
    ]
    if not any(r["measurements"] for _, r in files):
        lines += [
            "No GPU measurement has been made yet: there is no result file. The CPU dry run "
            "(`python bench/gpu_bench.py --dry-run`) checks the harness and writes under "
            "`bench/out/`.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        MEASURED_NOTE,
        "",
        "| " + " | ".join(RESULTS_COLUMNS) + " |",
        "|" + "---|" * len(RESULTS_COLUMNS),
    ]
    for path, results in files:
        invocations = {i["id"]: i for i in results["invocations"]}
        for m in results["measurements"]:
            cells = results_row(path, invocations[m["invocation"]], m, results["measurements"])
            lines.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            )
    return "\n".join(lines) + "\n"


def write_results_md(results_dir: Path) -> Path:
    path = results_dir / "RESULTS.md"
    runlog.write_text_atomic(path, render_results(results_dir))
    return path


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


def describe_invocation(
    args, argv: list[str], data: dict, machine: dict, invocation_id: str
) -> dict:
    command = ["python", display(Path(__file__)), *argv]
    return {
        "id": invocation_id,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "dry_run": args.dry_run,
        "machine": machine,
        "checkout": runlog.describe_checkout(),
        "trainer_sha256": sha256_file(TRAINER),
        "data": data,
        "settings": {
            "parts": args.parts,
            "minutes": args.minutes,
            "steps": args.steps,
            "nproc": args.nproc,
            "env": args.env,
            "presets": args.presets,
            "peer": None
            if args.peer is None
            else {"path": display(args.peer), "sha256": sha256_file(args.peer)},
        },
    }


def check_device(args, machine: dict) -> None:
    if args.dry_run:
        return
    if machine["gpu_count"] == 0:
        raise SystemExit(
            "error: no CUDA device here; the GPU parts would measure nothing. "
            "Use --dry-run to check the harness on this CPU"
        )
    if args.nproc > machine["gpu_count"]:
        raise SystemExit(
            f"error: --nproc {args.nproc} but only {machine['gpu_count']} GPU(s) are visible"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        print(write_results_md(args.results_dir))
        return 0
    require_zstandard()
    machine = runlog.describe_machine()
    check_device(args, machine)
    data, data_env = resolve_data(args)
    invocation_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    invocation = describe_invocation(args, argv, data, machine, invocation_id)
    path = results_path(args.results_dir, machine)
    print(
        f"machine: {machine['device']} gpus:{machine['gpu_count']} torch:{machine['torch']} "
        f"cuda:{machine['cuda']} python:{machine['python']}; data: {data['path']} ({data['note']})",
        flush=True,
    )
    append_measurement(path, invocation, None)
    statuses = []
    for m in Bench(args, data, data_env, invocation_id).measurements():
        append_measurement(path, invocation, m)
        write_results_md(args.results_dir)
        statuses.append(m["status"])
        print(
            f"{m['part']} {m['config']}: {m['status']}"
            + (f" ({m['error']})" if m["error"] else ""),
            flush=True,
        )
    write_results_md(args.results_dir)
    print(
        f"{statuses.count('ok')}/{len(statuses)} parts ok; RESULTS.md: "
        f"{args.results_dir / 'RESULTS.md'}"
    )
    print(path.resolve())
    return 0 if statuses.count("ok") == len(statuses) else PART_FAILED_STATUS


if __name__ == "__main__":
    sys.exit(main())
