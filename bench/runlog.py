"""What gpu_bench.py and ladder.py share: running a trainer, reading its log, machine and data.

The log reader understands train_gpt.py and the challenge's baseline script with the same code: both
write one `key:value` line per event, and the figures here are read by key, so extra fields do no
harm. Nothing heavy is imported: torch only in the child process that describes the machine. Shard
headers are read and results files written with data/shard_format.py, the module the tools share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The tools' shared module: shard headers, atomic writes. Imported after the path is set (E402);
# write_text_atomic is not used here but re-exported for gpu_bench.py and ladder.py (F401).
sys.path.insert(0, str(ROOT / "data"))
from shard_format import ShardError, read_header, shard_paths, write_text_atomic  # noqa: E402, F401

TRAINER = ROOT / "train_gpt.py"
# the published validation split (train_gpt.py's constant of the same name)
FINEWEB_VAL_TOKENS = 63_779_840
# step times are measured from here on: the first steps after warm-up still settle
STEADY_FROM_STEP = 10
ZSTANDARD_HELP = (
    "the Python package zstandard is missing (train_gpt.py writes its artifact with it): "
    "pip install zstandard, or with no network bring its wheel along and "
    "pip install --no-index zstandard-*.whl"
)


# -----------------------------------------------------------------------------
# Files
# -----------------------------------------------------------------------------


def read_json(path: Path, expected_format: str) -> dict | None:
    """Our results file, or None if absent; a damaged one stops the command (never replaced)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: {display(path)} is not readable JSON ({e}); repair or move it away, "
            "nothing was overwritten"
        ) from e
    if not isinstance(data, dict) or data.get("format") != expected_format:
        raise SystemExit(
            f"error: {display(path)} is not a {expected_format} file; move it away or choose "
            "another path"
        )
    return data


def display(path: Path | str) -> str:
    """A path as the results show it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# -----------------------------------------------------------------------------
# Running a trainer
# -----------------------------------------------------------------------------


@dataclass
class Outcome:
    returncode: int | None  # None: killed at the timeout
    wall_s: float
    # user + system CPU time of the run and its children: less sensitive to other load than wall_s
    cpu_s: float
    transcript: str  # stdout and stderr, interleaved as written


def trainer_command(script: Path, nproc: int) -> list[str]:
    """Plain python for one process, torch.distributed.run for several (as the README says)."""
    if nproc == 1:
        return [sys.executable, str(script)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
    ]


def run_trainer(
    command: list[str], env: dict, *, cwd: Path, transcript_path: Path, timeout_s: float
) -> Outcome:
    """Run to the end or the timeout (which kills the whole process group); output in a file."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    full_env.update(env)
    full_env["PYTHONUNBUFFERED"] = "1"  # a killed run still leaves every line it printed
    transcript_path.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), children_cpu_s()
    with open(transcript_path, "wb") as out:
        proc = subprocess.Popen(
            command,
            env=full_env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = None
        except BaseException:  # Ctrl-C on the harness: do not leave a trainer running on the device
            kill_group(proc)
            raise
    return Outcome(
        returncode,
        time.perf_counter() - t0,
        children_cpu_s() - cpu0,
        transcript_path.read_text(encoding="utf-8", errors="replace"),
    )


def children_cpu_s() -> float:
    """CPU seconds of every child process waited for so far (runs are waited for one at a time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the trainer and all it started (torch.distributed.run's workers): its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -----------------------------------------------------------------------------
# Reading a log
# -----------------------------------------------------------------------------

STEP_LINE = re.compile(r"^step:(\d+)/(\d+) train_loss:\S+ train_time:([\d.]+)ms")
VAL_LINE = re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+)")
PEAK_MEMORY = re.compile(r"^peak memory allocated:\s*(\d+)\s*MiB reserved:\s*(\d+)\s*MiB")
PEAK_RSS = re.compile(r"^peak memory rss:\s*(\d+)\s*MiB")
TOTAL_SIZE = re.compile(r"^Total submission size ([^:\s]+): (\d+) bytes")
ROUNDTRIP = re.compile(r"^final_\w+_roundtrip_exact ")
ROUNDTRIP_TIMED = re.compile(r"^final_\w+_roundtrip val_loss:\S+ val_bpb:\S+ eval_time:([\d.]+)ms")
SETTING = re.compile(r"^setting ([A-Z0-9_]+):(.*)$")
ERROR = re.compile(r"^error: (.+)$")


def fields(line: str) -> dict[str, str]:
    """The `key:value` pairs of a log line (values without spaces)."""
    return dict(re.findall(r"(\w+):(\S+)", line))


def number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.rstrip("%ms").lstrip("+"))  # without its unit: ms, s or %
    except ValueError:
        return None


def integer(text: str | None) -> int | None:
    value = number(text)
    return None if value is None else int(value)


@dataclass
class TrainerLog:
    """Everything read from one run's output; None where the run did not log it."""

    step_times: list = dataclasses.field(default_factory=list)  # (step, cumulative train_time_ms)
    # setting NAME:VALUE lines (train_gpt.py only)
    settings: dict = dataclasses.field(default_factory=dict)
    header: dict = dataclasses.field(default_factory=dict)  # the run_id:... world_size:... line
    model: dict = dataclasses.field(default_factory=dict)  # the model_params:... line
    warmup_ms: float | None = None
    steps: int | None = None
    train_time_ms: float | None = None
    data_epochs: float | None = None
    peak_allocated_mib: float | None = None
    peak_reserved_mib: float | None = None
    peak_rss_mib: float | None = None
    export_ms: float | None = None
    bytes_total: int | None = None
    artifact_format: str | None = None
    prequant_val_bpb: float | None = None
    roundtrip_val_bpb: float | None = None
    roundtrip_eval_ms: float | None = None
    # graphs torch.compile built for the evaluation, and its compile time
    roundtrip_graphs: int | None = None
    roundtrip_compile_ms: float | None = None
    quant_penalty_bpb: float | None = None
    sliding_val_bpb: float | None = None
    sliding_stride: int | None = None
    sliding_eval_ms: float | None = None
    sliding_graphs: int | None = None
    sliding_compile_ms: float | None = None
    scored_tokens: int | None = None
    sliding_tok_s: float | None = None
    projected_fineweb_8gpu_s: float | None = None
    ttt_val_bpb: float | None = None
    ttt_eval_ms: float | None = None
    looping_on: tuple | None = None  # (step, train_time_ms) when the loops switched on
    final_val_bpb: float | None = None
    completed: bool = False  # run_complete or throughput_run_complete
    error: str | None = None


def parse_log(transcript: str, log_file: Path | None = None) -> TrainerLog:
    """A run's figures from what it printed; its settings from its log file (never printed).

    Only printed lines are read: the log file also holds the script's source, whose f-strings look
    like log lines.
    """
    r = TrainerLog()
    last_val_bpb = None
    for line in transcript.splitlines():
        line = line.strip()
        f = fields(line)
        if m := STEP_LINE.match(line):
            r.step_times.append((int(m.group(1)), float(m.group(3))))
        elif m := VAL_LINE.match(line):
            last_val_bpb = float(m.group(4))
        elif line.startswith("run_id:") and "world_size:" in line:
            r.header = f
        elif line.startswith("model_params:"):
            r.model = f
        elif line.startswith("warmup_steps:") and "warmup_time" in f:
            r.warmup_ms = number(f["warmup_time"])
        elif line.startswith("training_done "):
            r.steps, r.train_time_ms = int(f["steps"]), number(f.get("train_time"))
            r.data_epochs = number(f.get("data_epochs"))
        elif m := PEAK_MEMORY.match(line):
            r.peak_allocated_mib, r.peak_reserved_mib = float(m.group(1)), float(m.group(2))
        elif m := PEAK_RSS.match(line):
            r.peak_rss_mib = float(m.group(1))
        elif line.startswith("artifact:") and "export_time" in f:
            r.export_ms = number(f["export_time"])
        elif m := TOTAL_SIZE.match(line):
            r.artifact_format, r.bytes_total = m.group(1), int(m.group(2))
        elif line.startswith("final_prequant_exact "):
            r.prequant_val_bpb = number(f.get("val_bpb"))
        elif ROUNDTRIP.match(line):
            r.roundtrip_val_bpb = number(f.get("val_bpb"))
            r.quant_penalty_bpb = number(f.get("quant_penalty_bpb"))
            r.roundtrip_eval_ms = number(f.get("eval_time")) or r.roundtrip_eval_ms
            r.roundtrip_graphs, r.roundtrip_compile_ms = (
                integer(f.get("graphs")),
                number(f.get("compile_time")),
            )
        elif m := ROUNDTRIP_TIMED.match(line):
            r.roundtrip_eval_ms = float(m.group(1))
        elif line.startswith("final_sliding_window_exact "):
            r.sliding_val_bpb, r.sliding_eval_ms = (
                number(f.get("val_bpb")),
                number(f.get("eval_time")),
            )
            r.sliding_graphs, r.sliding_compile_ms = (
                integer(f.get("graphs")),
                number(f.get("compile_time")),
            )
            r.sliding_stride, r.scored_tokens = (
                integer(f.get("stride")),
                integer(f.get("scored_tokens")),
            )
        elif line.startswith("final_ttt_exact "):
            r.ttt_val_bpb, r.ttt_eval_ms = number(f.get("val_bpb")), number(f.get("eval_time"))
        elif line.startswith("looping_on ") and "train_time" in f:
            r.looping_on = (int(f["step"]), number(f["train_time"]))
        elif line.startswith("sliding_rate "):
            r.sliding_tok_s = number(f.get("scored_tok_s"))
            r.projected_fineweb_8gpu_s = number(f.get("projected_fineweb_8gpu"))
        elif line.startswith(("run_complete ", "throughput_run_complete ")):
            r.completed = True
            r.final_val_bpb = number(f.get("val_bpb"))
        elif m := ERROR.match(line):
            r.error = m.group(1)
    # the baseline's last validation line is its pre-quantization score
    if r.prequant_val_bpb is None:
        r.prequant_val_bpb = last_val_bpb
    if r.quant_penalty_bpb is None and None not in (r.roundtrip_val_bpb, r.prequant_val_bpb):
        r.quant_penalty_bpb = r.roundtrip_val_bpb - r.prequant_val_bpb
    if r.final_val_bpb is None:
        r.final_val_bpb = (
            r.sliding_val_bpb if r.sliding_val_bpb is not None else r.roundtrip_val_bpb
        )
    if r.steps is None and r.step_times:
        r.steps, r.train_time_ms = r.step_times[-1]
    if log_file is not None and log_file.is_file():
        for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if m := SETTING.match(line):
                r.settings[m.group(1)] = m.group(2)
    return r


def steady_step_ms(
    step_times: list[tuple[int, float]], from_step: int = STEADY_FROM_STEP
) -> tuple[float, int] | None:
    """(ms per step, steps in the window) from the first logged step >= from_step to the last one.

    train_time is cumulative, so the difference of two step lines excludes everything before the
    first one (compilation happens in the warm-up, the first real steps still settle). Falls back to
    the earliest logged step when the run logged no step that late; None with fewer than two
    distinct steps.
    """
    times = sorted(dict(step_times).items())
    if len(times) < 2:
        return None
    start = next(((s, t) for s, t in times if s >= from_step and s < times[-1][0]), times[0])
    (s0, t0), (s1, t1) = start, times[-1]
    return (t1 - t0) / (s1 - s0), s1 - s0


def failure_reason(outcome: Outcome, log: TrainerLog, timeout_s: float) -> str | None:
    """Why a run did not complete (its error line, or its last printed line); None if it did."""
    if outcome.returncode is None:
        return f"timed out after {timeout_s:.0f}s (killed; figures are what it logged before)"
    if outcome.returncode == 0 and log.completed:
        return None
    if log.error:
        return log.error
    lines = [ln.strip() for ln in outcome.transcript.splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return (
        f"exit status {outcome.returncode}: {last}"
        if outcome.returncode
        else f"no completion line: {last}"
    )


def unread_settings_error(keys, settings: dict) -> str | None:
    """An error naming the keys the trainer does not list among its settings (it would ignore them);
    None when every key is a setting, or while the settings are unknown (no run has logged them
    yet)."""
    unknown = [k for k in keys if k not in settings] if settings else []
    if not unknown:
        return None
    verb = "is not a setting" if len(unknown) == 1 else "are not settings"
    return f"{', '.join(unknown)} {verb} of train_gpt.py (it would be ignored); check the name"


def parse_assignments(items, what: str) -> dict[str, str]:
    """KEY=VALUE strings as a dict; a bad one stops the command naming `what` (the flag or file)."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(
                f"error: {what}: {item!r} is not KEY=VALUE with an upper-case KEY (e.g. QAT=0)"
            )
        env[key] = value
    return env


# -----------------------------------------------------------------------------
# Data, machine, checkout
# -----------------------------------------------------------------------------


def shard_tokens(pattern_dir: Path, split: str) -> int:
    """Token count of a split from its shard headers, without reading the tokens; a shard whose
    header or size is wrong stops the command."""
    total = 0
    for path in shard_paths(pattern_dir, split):
        try:
            total += read_header(path)
        except ShardError as e:
            raise SystemExit(f"error: {e}; rebuild or re-download the data") from None
    return total


def describe_data(data_path: Path, tokenizer_path: Path, vocab_size: int) -> dict:
    """Which data a measurement used, and whether its scores are FineWeb scores."""
    val_tokens, train_tokens = shard_tokens(data_path, "val"), shard_tokens(data_path, "train")
    if not val_tokens or not train_tokens:
        raise SystemExit(
            f"error: {display(data_path)} holds no fineweb_val_*.bin or fineweb_train_*.bin "
            "shards; build them with `python data/build_dataset.py` or give --data-path"
        )
    fineweb = val_tokens == FINEWEB_VAL_TOKENS
    return {
        "name": data_path.name,
        "path": display(data_path),
        "tokenizer": display(tokenizer_path),
        "vocab_size": vocab_size,
        "val_tokens": val_tokens,
        "train_tokens": train_tokens,
        "fineweb": fineweb,
        "note": "the published FineWeb validation split"
        if fineweb
        else "not FineWeb: scores on this data are not comparable with challenge scores",
    }


MACHINE_PROBE = """
import json, os, platform, torch
gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [])
print(json.dumps({"device": gpus[0] if gpus else f"CPU {platform.machine()}",
                  "gpu_count": len(gpus), "gpus": gpus,
                  "torch": torch.__version__, "cuda": torch.version.cuda if gpus else None,
                  "python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count()}))
"""


def describe_machine() -> dict:
    """Devices and versions, from a subprocess: the harness never imports torch or touches CUDA."""
    out = subprocess.run(
        [sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(
            f"error: could not import torch to describe the machine ({last}); set up the "
            "environment with `bash scripts/setup_env.sh` or install torch"
        )
    return {**json.loads(out.stdout), "driver": nvidia_driver()}


def nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def describe_checkout() -> dict:
    """Commit of the checkout and whether it has uncommitted changes (None outside a checkout)."""

    def git(*args):
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") if shutil.which("git") else None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if commit else None}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
