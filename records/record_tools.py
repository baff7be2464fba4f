"""Finished runs -> submission folder, plus the statistics a record needs.

The library behind `records/make_submission.py`. It reads what `train_gpt.py` writes for
each run -- `logs/{RUN_ID}.txt` (the source that ran, then grep-able `key:value` lines) and
`logs/{RUN_ID}.json` (the summary, written last) -- and provides:

- `load_run` / `check_submittable` / `make_submission`: a verified submission folder;
- `load_scores` / `compare`: Welch's one-sided t-test "improves by at least D" on the
  final scores of finished runs;
- `sweep_table`: every run under a folder, sorted by score, with the settings that differ;
- `plot_runs`: val_bpb against training time and step (needs matplotlib, imported lazily);
- `pack_code` / `unpack_code`: train_gpt.py as an lzma-compressed, self-extracting file.

Every refusal is a `RecordError` whose message names the file and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import io
import json
import lzma
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))  # the tools' shared module
from shard_format import write_bytes_atomic  # noqa: E402

ARTIFACT_LIMIT_BYTES = 16_000_000  # the track's cap on code + compressed model, decimal bytes
TRAIN_TIME_LIMIT_MS = 600_000  # the track's 10 minutes of training on 8xH100
TRACK_WORLD_SIZE = 8
TRACK_DIR = Path(__file__).resolve().parent / "track_10min_16mb"
DEFAULT_CODE_PATH = Path(__file__).resolve().parent.parent / "train_gpt.py"
# The original record rule: beat the previous record by at least 0.005 nats at p < 0.01.
DEFAULT_MIN_IMPROVEMENT = 0.005
DEFAULT_ALPHA = 0.01
# Settings allowed to differ between the seeds of one submission: which run it is and
# where it writes its files. Everything else must match.
PER_RUN_SETTINGS = frozenset({"RUN_ID", "SEED", "LOG_DIR", "ARTIFACT_DIR"})
SUMMARY_KEYS = (
    "run_id",
    "seed",
    "val_bpb",
    "val_loss",
    "prequant_val_bpb",
    "roundtrip_val_bpb",
    "bytes_model",
    "bytes_code",
    "bytes_total",
    "fits",
    "steps",
    "train_time_ms",
    "step_avg_ms",
    "world_size",
    "code_sha256",
    "hyperparameters",
    "env_overrides",
    "val_history",
)
METRIC_UNITS = {"val_loss": "nats", "val_bpb": "bpb"}

CODE_BEGIN = re.compile(r"code_begin path:(\S+) bytes:(\d+) sha256:([0-9a-f]{64})")
ROUNDTRIP_LINE = re.compile(r"final_\S*roundtrip\S*_exact\s")
TOTAL_SIZE_LINE = re.compile(r"Total submission size [^:]*: (\d+) bytes")
FITS_LINE = re.compile(r"fits_16mb:(true|false)\b")
# Any final score line: this trainer's run_complete, or e.g. final_int8_zlib_roundtrip_exact.
FINAL_SCORE_LINE = re.compile(r"(run_complete|final_\S+_exact)\s.*val_loss:[0-9]")
# The evaluations a run's score can come from, in train_gpt.py's order (its score is TTT's when
# on, else the sliding window's when on, else the round trip's): summary key, log line.
FINAL_EVALUATIONS = (
    ("ttt", "final_ttt_exact"),
    ("sliding", "final_sliding_window_exact"),
    ("roundtrip", "final_int6_roundtrip_exact"),
)


class RecordError(Exception):
    """A refusal or unreadable input; the message names the file and what is wrong."""


FAILED = "a failed run is never ranked, compared or submitted"


def failure_line(lines: Iterable[str]) -> str | None:
    """The `error: ...` line train_gpt.py writes into the log of a run that failed, if any."""
    return next((line.strip() for line in lines if line.startswith("error:")), None)


def check_score(data: dict, where: object) -> dict:
    """Refuse a run summary without a finite score (a diverged run from before such runs failed)."""
    for key in ("val_bpb", "val_loss"):
        value = data.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordError(f"{where}: {key} is {value}: the run failed; {FAILED}")
    return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fields(line: str) -> dict[str, str]:
    """The `key:value` tokens of one log line."""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected a JSON object")
    return data


def files_under(root: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` under `root`, leaving out hidden folders (.ipynb_checkpoints)."""
    return sorted(
        p
        for p in root.rglob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])
    )


def read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except OSError as err:
        raise RecordError(f"cannot read {path}: {err.strerror}") from None


def _printed_matches(printed: str, value: float) -> bool:
    """Whether a number printed in the log is `value` rounded to the printed digits."""
    if "e" in printed.lower():
        return math.isclose(float(printed), float(value), rel_tol=1e-6)
    decimals = len(printed.partition(".")[2])
    return abs(float(printed) - float(value)) <= 0.51 * 10.0**-decimals


# ---------------------------------------------------------------------------------------
# Reading one run
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run whose log and summary agree with each other."""

    log_path: Path
    summary_path: Path
    source: bytes  # the trainer source copied into the log: the file that ran
    summary: dict

    @property
    def run_id(self) -> str:
        return str(self.summary["run_id"])

    @property
    def source_sha256(self) -> str:
        return sha256_hex(self.source)


def run_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(`X.txt`, `X.json`) for a run given as its log, its summary or the common stem."""
    path = Path(path)
    if path.suffix in (".txt", ".json"):
        path = path.with_name(path.name[: -len(path.suffix)])
    return path.with_name(path.name + ".txt"), path.with_name(path.name + ".json")


def split_log(log_path: Path) -> tuple[bytes, list[str]]:
    """(source copied into the log, the log's lines after `code_end`)."""
    raw = log_path.read_bytes()
    first_line, _, body = raw.partition(b"\n")
    match = CODE_BEGIN.fullmatch(first_line.decode("utf-8", "replace").rstrip("\r"))
    if match is None:
        raise RecordError(
            f"{log_path}: the first line is not 'code_begin path:... bytes:N sha256:HEX', "
            "so this is not a train log written by train_gpt.py"
        )
    size, expected_sha = int(match[2]), match[3]
    source = body[:size]
    if len(source) < size:
        raise RecordError(
            f"{log_path}: the log ends inside the copied source ({len(source)} of {size} bytes)"
        )
    if sha256_hex(source) != expected_sha:
        raise RecordError(
            f"{log_path}: the copied source does not hash to the sha256 in its code_begin line"
        )
    rest = body[size:]
    if rest.startswith(b"\n"):
        rest = rest[1:]  # the trainer ends the copy with a newline of its own
    end_line, _, after = rest.partition(b"\n")
    if end_line.rstrip(b"\r") != b"code_end":
        raise RecordError(
            f"{log_path}: no 'code_end' line right after the {size} bytes of copied source"
        )
    return source, after.decode("utf-8", "replace").splitlines()


def read_summary(summary_path: Path) -> dict:
    summary = _read_json(summary_path)
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        raise RecordError(f"{summary_path}: not a run summary, missing {', '.join(missing)}")
    return summary


def is_run_summary(data: object) -> bool:
    return isinstance(data, dict) and all(key in data for key in SUMMARY_KEYS)


def _check_finished(log_path: Path, lines: list[str]) -> str:
    """Refuse a log without its final lines; returns the run_complete line."""
    nonempty = [line.strip() for line in lines if line.strip()]
    if any(line.startswith("code_begin ") for line in nonempty):
        raise RecordError(
            f"{log_path}: holds more than one run (a second code_begin line): logs joined by hand "
            "(train_gpt.py refuses a RUN_ID whose log exists); give each run's own log"
        )
    failed = failure_line(nonempty)
    if failed:
        raise RecordError(f"{log_path}: the run failed ({failed[:200]}); {FAILED}")
    last = nonempty[-1] if nonempty else "(nothing after code_end)"
    if not last.startswith("run_complete "):
        raise RecordError(
            f"{log_path}: the run did not finish: its last line is {last[:120]!r}, "
            "not 'run_complete run_id:... val_loss:... val_bpb:...'"
        )
    for pattern, what in (
        (ROUNDTRIP_LINE, "final_int6_roundtrip_exact"),
        (TOTAL_SIZE_LINE, "Total submission size"),
        (FITS_LINE, "fits_16mb"),
    ):
        if not any(pattern.match(line) for line in nonempty):
            raise RecordError(f"{log_path}: the run did not finish: no '{what}' line")
    return last


def _check_log_matches_summary(
    log_path: Path,
    source: bytes,
    lines: list[str],
    complete_line: str,
    summary_path: Path,
    summary: dict,
) -> None:
    def disagree(what: str) -> RecordError:
        return RecordError(f"{log_path} and {summary_path} disagree: {what}")

    if summary["code_sha256"] != sha256_hex(source):
        raise disagree(
            f"code_sha256 {summary['code_sha256']} is not the sha256 of the "
            f"source copied into the log ({sha256_hex(source)})"
        )
    if summary["bytes_code"] != len(source):
        raise disagree(
            f"bytes_code {summary['bytes_code']} but the source that ran is {len(source)} bytes"
        )
    if summary["bytes_total"] != summary["bytes_model"] + summary["bytes_code"]:
        raise disagree(
            f"bytes_total {summary['bytes_total']} is not bytes_model "
            f"{summary['bytes_model']} + bytes_code {summary['bytes_code']}"
        )
    logged_total = next(int(m[1]) for line in lines if (m := TOTAL_SIZE_LINE.match(line.strip())))
    if logged_total != summary["bytes_total"]:
        raise disagree(
            f"the log's total submission size is {logged_total} bytes, "
            f"the summary's bytes_total {summary['bytes_total']}"
        )
    if bool(summary["fits"]) != (summary["bytes_total"] <= ARTIFACT_LIMIT_BYTES):
        raise disagree(f"fits is {summary['fits']} for bytes_total {summary['bytes_total']}")
    complete = fields(complete_line)
    if complete.get("run_id") != str(summary["run_id"]):
        raise disagree(
            f"run_complete names run {complete.get('run_id')!r}, the summary {summary['run_id']!r}"
        )
    for key in ("val_loss", "val_bpb"):
        if key not in complete or not _printed_matches(complete[key], summary[key]):
            raise disagree(
                f"run_complete {key}:{complete.get(key)} but the summary has {summary[key]}"
            )


def failed_logs(path: str | os.PathLike) -> list[Path]:
    """The logs train_gpt.py set aside for runs of this name that failed before training
    (`{stem}.failed.txt`, then `{stem}.failed-1.txt`, ...), oldest first."""
    log_path = run_paths(path)[0]
    name = re.compile(re.escape(log_path.name.removesuffix(".txt")) + r"\.failed(?:-(\d+))?\.txt")
    if not log_path.parent.is_dir():
        return []
    found = [
        (int(m[1] or 0), p)
        for p in log_path.parent.iterdir()
        if (m := name.fullmatch(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def failed_run_error(path: str | os.PathLike) -> RecordError | None:
    """The refusal of a run known only by the log train_gpt.py set aside when it failed before
    training; None when there is no such log."""
    logs = failed_logs(path)
    if not logs:
        return None
    try:
        error = failure_line(split_log(logs[-1])[1])
    except RecordError:
        error = None
    earlier = f", beside {len(logs) - 1} earlier failed log(s)" if len(logs) > 1 else ""
    return RecordError(
        f"{path}: the run failed before training ({(error or 'no error line')[:200]}); its log is "
        f"{logs[-1]}{earlier}; {FAILED}"
    )


def load_run(path: str | os.PathLike) -> Run:
    """Read a finished run from its log and summary, checking that they agree."""
    log_path, summary_path = run_paths(path)
    if not log_path.is_file():
        raise failed_run_error(path) or RecordError(f"{log_path}: no such train log")
    source, lines = split_log(log_path)
    complete_line = _check_finished(log_path, lines)
    if not summary_path.is_file():
        raise RecordError(
            f"{summary_path}: missing; train_gpt.py writes the summary last, "
            "so the run did not finish"
        )
    summary = check_score(read_summary(summary_path), summary_path)
    _check_log_matches_summary(log_path, source, lines, complete_line, summary_path, summary)
    return Run(log_path=log_path, summary_path=summary_path, source=source, summary=summary)


# ---------------------------------------------------------------------------------------
# Packed code
# ---------------------------------------------------------------------------------------

# A packed train_gpt.py is this stub around one base85 string: the source, xz-compressed.
# Run as a script (python, torchrun), it decompresses the source and executes it as the
# file's own module: __name__ and __file__ are the packed file's, so main() reads and logs
# the packed file's bytes as the code that ran. linecache gets the source so that
# tracebacks show its lines. Nothing else is executed: unpack_code() accepts only this
# exact stub, byte for byte, around a base85 payload.
PACKED_HEAD = (
    b"# train_gpt.py, lzma-packed. Source: python records/make_submission.py unpack FILE\n"
    b"import base64,linecache,lzma\n"
    b's=lzma.decompress(base64.b85decode("'
)
PACKED_TAIL = (
    b'")).decode()\n'
    b'n="<unpacked train_gpt.py>"\n'
    b"linecache.cache[n]=len(s),None,s.splitlines(True),n\n"
    b'exec(compile(s,n,"exec"))\n'
)
BASE85_PAYLOAD = re.compile(rb"[0-9A-Za-z!#$%&()*+\-;<=>?@^_`{|}~]*")
MAX_UNPACKED_BYTES = 16_000_000  # no source is larger than the whole artifact


def pack_code(source: bytes, name: str = "train_gpt.py") -> bytes:
    """The packed, self-extracting form of a Python source (UTF-8, compilable)."""
    if source.startswith(PACKED_HEAD):
        raise RecordError(f"{name} is already packed")
    try:
        compile(source.decode("utf-8"), name, "exec")  # compiles only; nothing runs
    except (UnicodeDecodeError, SyntaxError, ValueError) as err:
        raise RecordError(f"{name} is not a Python source that compiles: {err}") from None
    payload = lzma.compress(source, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    return PACKED_HEAD + base64.b85encode(payload) + PACKED_TAIL


def unpack_code(data: bytes, name: str = "train_gpt.py") -> bytes | None:
    """The source inside a packed file, None for a plain source. Never executes anything:
    a file that starts like a packed one must be exactly the stub around a valid payload."""
    if not data.startswith(PACKED_HEAD):
        return None
    if not data.endswith(PACKED_TAIL) or len(data) < len(PACKED_HEAD) + len(PACKED_TAIL):
        raise RecordError(
            f"{name} starts like a packed train_gpt.py but does not end with the packer's "
            "stub: it was edited after packing; pack the source again"
        )
    payload = data[len(PACKED_HEAD) : -len(PACKED_TAIL)]
    if not BASE85_PAYLOAD.fullmatch(payload):
        raise RecordError(
            f"{name}: the packed payload holds characters outside base85 (the stub was "
            "edited after packing); pack the source again"
        )
    try:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        source = decompressor.decompress(base64.b85decode(payload), max_length=MAX_UNPACKED_BYTES)
    except (ValueError, lzma.LZMAError, binascii.Error) as err:
        raise RecordError(
            f"{name}: the packed payload is damaged ({err}); pack the source again"
        ) from None
    if not decompressor.eof:
        raise RecordError(
            f"{name}: the packed payload is truncated or unpacks to over "
            f"{MAX_UNPACKED_BYTES:,} bytes; pack the source again"
        )
    if decompressor.unused_data:
        raise RecordError(
            f"{name}: the packed payload has bytes after its end; pack the source again"
        )
    return source


# ---------------------------------------------------------------------------------------
# Submission folder
# ---------------------------------------------------------------------------------------


def shared_settings(run: Run) -> dict:
    """The run's configuration without the settings each seed sets for itself."""
    config = {k: v for k, v in run.summary["hyperparameters"].items() if k not in PER_RUN_SETTINGS}
    config["world_size"] = run.summary["world_size"]
    return config


def check_submittable(runs: Sequence[Run], code: bytes, code_path: Path) -> None:
    """Refuse runs that cannot form one submission shipping `code`."""
    if not runs:
        raise RecordError("no runs given")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.run_id in seen:
            raise RecordError(
                f"{run.log_path}: run {run.run_id!r} is given twice "
                f"(also {seen[run.run_id].log_path})"
            )
        seen[run.run_id] = run
        total = run.summary["bytes_total"]
        if total > ARTIFACT_LIMIT_BYTES:
            raise RecordError(
                f"{run.summary_path}: the artifact does not fit: bytes_total {total:,} is "
                f"{total - ARTIFACT_LIMIT_BYTES:,} bytes over the {ARTIFACT_LIMIT_BYTES:,}-byte "
                "limit"
            )
    first = runs[0]
    for run in runs[1:]:
        if run.source != first.source:
            raise RecordError(
                f"runs made with different code: {first.log_path} ran sha256 "
                f"{first.source_sha256[:16]}... ({len(first.source):,} bytes), {run.log_path} "
                f"ran sha256 {run.source_sha256[:16]}... ({len(run.source):,} bytes)"
            )
    if code != first.source:
        raise RecordError(
            f"{code_path} is not the file that ran: sha256 {sha256_hex(code)[:16]}... "
            f"({len(code):,} bytes), but the source copied into {first.log_path} has sha256 "
            f"{first.source_sha256[:16]}... ({len(first.source):,} bytes)"
        )
    seeds: dict[object, Run] = {}
    for run in runs:
        seed = run.summary["seed"]
        if seed in seeds:
            raise RecordError(
                f"{run.summary_path}: seed {seed} is also the seed of "
                f"{seeds[seed].summary_path}; each run needs its own seed"
            )
        seeds[seed] = run
    base = shared_settings(first)
    for run in runs[1:]:
        other = shared_settings(run)
        for key in sorted(base.keys() | other.keys()):
            if base.get(key) != other.get(key):
                raise RecordError(
                    f"runs differ in {key}: {first.summary_path} has {base.get(key)!r}, "
                    f"{run.summary_path} has {other.get(key)!r}; the seeds of a submission "
                    "share one configuration"
                )


def env_value(value: object) -> str:
    """A setting as it is written in the environment (booleans are 0/1)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def folder_name(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_.")
    if not slug:
        raise RecordError(f"name {name!r} has no letters or digits to name the folder")
    return slug


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _per_run_entry(run: Run) -> dict:
    s = run.summary
    keys = (
        "run_id",
        "seed",
        "val_loss",
        "val_bpb",
        "prequant_val_loss",
        "prequant_val_bpb",
        "roundtrip_val_loss",
        "roundtrip_val_bpb",
        "sliding_val_loss",
        "sliding_val_bpb",
        "ttt_val_loss",
        "ttt_val_bpb",
        "bytes_model",
        "bytes_total",
        "steps",
        "train_time_ms",
        "step_avg_ms",
    )
    return {key: s.get(key) for key in keys}


def submission_json(
    runs: Sequence[Run],
    *,
    author: str,
    github_id: str,
    name: str,
    blurb: str,
    date: str,
    comparison: Comparison | None = None,
    packed_source: bytes | None = None,
) -> dict:
    losses = [r.summary["val_loss"] for r in runs]
    bpbs = [r.summary["val_bpb"] for r in runs]
    data = {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date,
        "val_loss": round(statistics.fmean(losses), 8),
        "val_bpb": round(statistics.fmean(bpbs), 8),
        "val_loss_std": round(_mean_std(losses)[1], 8),
        "val_bpb_std": round(_mean_std(bpbs)[1], 8),
        "bytes_total": max(r.summary["bytes_total"] for r in runs),
        "bytes_code": len(runs[0].source),
        "code_sha256": runs[0].source_sha256,
        "runs": [_per_run_entry(r) for r in runs],
    }
    if packed_source is not None:
        data["code_packed"] = {
            "bytes_source": len(packed_source),
            "source_sha256": sha256_hex(packed_source),
        }
    if comparison is not None:
        data["significance"] = comparison.as_dict()
    return data


def _markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.1f} s"


def readme_text(runs: Sequence[Run], meta: dict, comparison: Comparison | None) -> str:
    first = runs[0].summary
    overrides = {k: v for k, v in first["env_overrides"].items() if k not in PER_RUN_SETTINGS}
    world_size = first["world_size"]
    score_kind = (
        f"sliding-window eval of the shipped artifact, stride "
        f"{first['hyperparameters'].get('EVAL_STRIDE')}"
        if first.get("sliding_val_bpb") is not None
        else "the shipped artifact, read back and scored"
    )
    rows = [
        (
            r.summary["seed"],
            f"`{r.run_id}`",
            f"{r.summary['val_loss']:.6f}",
            f"{r.summary['val_bpb']:.6f}",
            f"{r.summary['prequant_val_bpb']:.4f}",
            r.summary["steps"],
            f"{r.summary['step_avg_ms']:.2f} ms",
            _seconds(r.summary["train_time_ms"]),
            f"{r.summary['bytes_total']:,}",
        )
        for r in runs
    ]
    rows.append(
        (
            "**mean**",
            "",
            f"{meta['val_loss']:.6f}",
            f"**{meta['val_bpb']:.6f}**",
            "",
            "",
            "",
            "",
            f"max {meta['bytes_total']:,}",
        )
    )
    results = _markdown_table(
        (
            "seed",
            "run",
            "val_loss (nats)",
            "val_bpb",
            "pre-quant val_bpb",
            "steps",
            "step avg",
            "train time",
            "bytes_total",
        ),
        rows,
    )
    if overrides:
        config = (
            "Settings that differ from the defaults of `train_gpt.py` "
            "(the same for every seed):\n\n"
            + _markdown_table(
                ("setting", "value"),
                ((f"`{k}`", f"`{env_value(v)}`") for k, v in sorted(overrides.items())),
            )
        )
    else:
        config = "Every setting is at its default in `train_gpt.py` (apart from SEED and RUN_ID)."
    common_env = " ".join(f"{k}={shlex.quote(env_value(v))}" for k, v in sorted(overrides.items()))
    commands = "\n".join(
        " ".join(
            part
            for part in (
                f"SEED={shlex.quote(env_value(r.summary['seed']))}",
                f"RUN_ID={shlex.quote(r.run_id)}",
                common_env,
                f"torchrun --standalone --nproc_per_node={world_size} train_gpt.py",
            )
            if part
        )
        for r in runs
    )
    files = "\n".join(
        f"- `{r.log_path.name}`, `{r.summary_path.name}`: train log and summary "
        f"of seed {r.summary['seed']}"
        for r in runs
    )
    sections = [
        f"# {meta['name']}",
        meta["blurb"],
        f"Author: {meta['author']} (@{meta['github_id']}), {meta['date']}.",
        "## Results",
        f"val_bpb **{meta['val_bpb']:.6f}** (mean of {len(runs)} seeds, std "
        f"{meta['val_bpb_std']:.6f}); val_loss {meta['val_loss']:.6f} nats. Score: "
        f"{score_kind}. Largest artifact {meta['bytes_total']:,} bytes "
        f"(code {meta['bytes_code']:,} bytes), limit {ARTIFACT_LIMIT_BYTES:,}.",
        results,
    ]
    if comparison is not None:
        sections += ["## Significance", "```\n" + comparison.format() + "\n```"]
    sections += [
        "## Configuration",
        config,
        "## Reproduce",
        f"From the folder holding this `train_gpt.py`, with the data in place, one run per "
        f"seed ({world_size} GPU{'s' if world_size != 1 else ''} each); each writes "
        "`logs/{RUN_ID}.txt` and `logs/{RUN_ID}.json`:",
        "```bash\n" + commands + "\n```",
        "## Files",
        f"- `train_gpt.py`: the script that ran (sha256 `{meta['code_sha256']}`), identical "
        "byte for byte to the source copied at the top of every log"
        + packed_note(meta)
        + "\n"
        + files
        + "\n- `submission.json`: the means, the largest artifact and the per-seed values",
    ]
    return "\n\n".join(sections) + "\n"


def packed_note(meta: dict) -> str:
    packed = meta.get("code_packed")
    if packed is None:
        return ""
    return (
        f". It is lzma-packed: it decompresses and runs its embedded source "
        f"({packed['bytes_source']:,} bytes, sha256 `{packed['source_sha256']}`), which "
        "`python records/make_submission.py unpack train_gpt.py` prints"
    )


def make_submission(
    runs: Sequence[Run],
    *,
    name: str,
    author: str,
    github_id: str,
    blurb: str,
    date: str | None = None,
    code_path: str | os.PathLike = DEFAULT_CODE_PATH,
    track_dir: str | os.PathLike = TRACK_DIR,
    folder: str | None = None,
    comparison: Comparison | None = None,
) -> Path:
    """Create `track_dir/DATE_FOLDER/` from finished runs (see `load_run`); returns it."""
    date = date or datetime.date.today().isoformat()
    try:
        datetime.date.fromisoformat(date)
    except ValueError as err:
        raise RecordError(f"date {date!r} is not YYYY-MM-DD") from err
    track_dir = Path(track_dir)
    target = track_dir / f"{date}_{folder_name(folder or name)}"
    if target.exists():
        raise RecordError(f"{target}: already exists; choose another name or remove it first")
    code_path = Path(code_path)
    if not code_path.is_file():
        raise RecordError(f"{code_path}: no such file (the train_gpt.py to ship)")
    code = code_path.read_bytes()
    check_submittable(runs, code, code_path)
    meta = submission_json(
        runs,
        author=author,
        github_id=github_id,
        name=name,
        blurb=blurb,
        date=date,
        comparison=comparison,
        packed_source=unpack_code(code, str(code_path)),
    )
    readme = readme_text(runs, meta, comparison)

    track_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=track_dir))
    try:
        (staging / "train_gpt.py").write_bytes(code)
        for run in runs:
            shutil.copyfile(run.log_path, staging / run.log_path.name)
            shutil.copyfile(run.summary_path, staging / run.summary_path.name)
        (staging / "submission.json").write_text(
            json.dumps(meta, indent=2) + "\n", encoding="utf-8"
        )
        (staging / "README.md").write_text(readme, encoding="utf-8")
        if target.exists():
            raise RecordError(f"{target}: already exists; choose another name or remove it first")
        staging.chmod(0o755)  # mkdtemp makes it private
        os.rename(staging, target)  # the folder appears complete or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def track_warnings(runs: Sequence[Run]) -> list[str]:
    """What keeps runs off the record track without making them wrong: too long, too few GPUs."""
    warnings = []
    for r in runs:
        if r.summary["train_time_ms"] > TRAIN_TIME_LIMIT_MS:
            warnings.append(
                f"{r.summary_path}: trained for {_seconds(r.summary['train_time_ms'])}, "
                f"over the {TRAIN_TIME_LIMIT_MS // 1000} s of the track"
            )
        if r.summary["world_size"] != TRACK_WORLD_SIZE:
            warnings.append(
                f"{r.summary_path}: ran on {r.summary['world_size']} process(es); "
                f"the track is {TRACK_WORLD_SIZE}xH100"
            )
    return warnings


# ---------------------------------------------------------------------------------------
# Significance
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Score:
    """One run's final score, where it was read and which evaluation gave it (a final_*_exact
    line's name; None when the file does not say)."""

    label: str
    val_loss: float
    val_bpb: float
    where: str = dataclasses.field(default="", compare=False)
    evaluation: str | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class SummaryStats:
    """A reference given as mean, sample standard deviation (ddof=1) and number of runs."""

    mean: float
    std: float
    n: int


# Added to a refusal of a run named for a comparison: what to do about it.
COMPARE_ONLY_FINISHED = "only finished runs are compared; leave it out"


def final_evaluation(summary: dict) -> str | None:
    """The evaluation a run summary's score comes from (train_gpt.py's rule, FINAL_EVALUATIONS);
    None when none of them holds its val_bpb (a summary of another kind)."""
    return next(
        (
            line
            for key, line in FINAL_EVALUATIONS
            if summary.get(f"{key}_val_bpb") is not None
            and summary[f"{key}_val_bpb"] == summary.get("val_bpb")
        ),
        None,
    )


def run_score(run: Run) -> Score:
    """A finished run's score (see load_run): its summary's, which its run_complete line holds."""
    s = run.summary
    where, evaluation = str(run.summary_path), final_evaluation(s)
    return Score(run.run_id, float(s["val_loss"]), float(s["val_bpb"]), where, evaluation)


def _log_score(path: Path) -> Score | None:
    """The final score of a train log read without a summary: its run_complete line, else (a log
    of another trainer) its last final_*_exact line; None when it has neither. A log written by
    train_gpt.py (it starts with code_begin) counts only when it finished."""
    if path.read_bytes()[:11] == b"code_begin ":
        lines = split_log(path)[1]
        _check_finished(path, lines)
    else:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        failed = failure_line(lines)
        if failed:
            raise RecordError(f"{path}: the run failed ({failed[:200]}); {FAILED}")
    finals = [line.strip() for line in lines if FINAL_SCORE_LINE.match(line.strip())]
    if not finals:
        return None
    complete = [line for line in finals if line.startswith("run_complete ")]
    f = fields((complete or finals)[-1])
    # the evaluation: the last final_*_exact line that holds this score
    evaluation = next(
        (
            line.split()[0]
            for line in reversed(finals)
            if not line.startswith("run_complete ")
            and (fields(line).get("val_loss"), fields(line).get("val_bpb"))
            == (f["val_loss"], f.get("val_bpb"))
        ),
        None,
    )
    return Score(
        f.get("run_id", path.stem), float(f["val_loss"]), float(f["val_bpb"]), str(path), evaluation
    )


def _json_scores(path: Path) -> list[Score]:
    data = _read_json(path)
    if isinstance(data.get("runs"), list):
        return [
            Score(
                str(r.get("run_id", f"{path.parent.name}#{i}")),
                float(r["val_loss"]),
                float(r["val_bpb"]),
                f"{path} ({r.get('run_id', i)})",
                final_evaluation(r),
            )
            for i, r in enumerate(check_score(r, path) for r in data["runs"])
        ]
    if "run_id" in data and "val_loss" in data and "val_bpb" in data:
        check_score(data, path)
        return [
            Score(str(data["run_id"]), float(data["val_loss"]), float(data["val_bpb"]), str(path))
        ]
    if "val_loss" in data:
        raise RecordError(
            f"{path}: holds only the mean over its runs; give the record's train logs "
            "(or its folder), or --ref-mean/--ref-std/--ref-n"
        )
    raise RecordError(f"{path}: neither a run summary nor a submission.json")


def _path_scores(path: Path) -> list[Score]:
    """The scores of a path that is not a folder: a run of train_gpt.py (its log, summary or
    stem; only a finished run, as load_run reads it), a submission.json, or another trainer's
    log. A run refused says what to do."""
    if path.is_file() and path.suffix == ".json" and not is_run_summary(_read_json(path)):
        return _json_scores(path)  # a submission.json, or a summary of another kind
    if not (path.is_file() or any(p.is_file() for p in run_paths(path)) or failed_logs(path)):
        raise RecordError(f"{path}: no such file or folder")
    # a run of train_gpt.py, read with load_run: named by its stem, its summary or its log
    own_run = (
        not path.is_file()
        or path.suffix == ".json"
        or (path.suffix == ".txt" and path.read_bytes()[:11] == b"code_begin ")
    )
    try:
        score = run_score(load_run(path)) if own_run else _log_score(path)
        if score is None:
            raise RecordError(
                f"{path}: no final score line (run_complete or final_*_exact); did the run finish?"
            )
    except RecordError as err:
        raise RecordError(f"{err}; {COMPARE_ONLY_FINISHED}") from None
    return [score]


def load_scores(paths: Sequence[str | os.PathLike]) -> tuple[list[Score], list[str]]:
    """Final scores from run summaries, train logs, submission.json files or folders.

    A run of train_gpt.py counts only when it finished (load_run's checks: run_complete last,
    no error line, its summary beside it) and scores what its summary and run_complete line
    hold; a named run that did not is refused. A folder gives its submission.json's per-run
    values if it has them, else every finished run's summary under it, else every train log
    under it with a final score line; what it leaves out is noted. Returns the scores and the
    notes.
    """
    scores: list[Score] = []
    notes: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            scores += _path_scores(path)
            continue
        submission = path / "submission.json"
        if submission.is_file() and isinstance(_read_json(submission).get("runs"), list):
            scores += _json_scores(submission)
            continue
        summaries, unfinished, failed = find_summaries(path)
        notes += [f"{p}: skipped, {why}" for p, why in failed]
        notes += [f"{p}: skipped, the run did not finish (no summary)" for p in unfinished]
        if summaries:
            files = [p for p, _ in summaries]
        else:
            left_out = {run_paths(p)[0] for p, _ in failed} | set(unfinished)
            logs = files_under(path, "*.txt") + files_under(path, "*.log")
            if not logs:
                raise RecordError(f"{path}: no run summaries or train logs in this folder")
            files = [p for p in logs if p not in left_out]
        for p in files:
            try:
                scores += _path_scores(p)
            except RecordError as err:
                notes.append(f"skipped: {err}")
    return scores, notes


def one_evaluation(scores: Sequence[Score], side: str) -> str | None:
    """The evaluation that every score of one side comes from (None if no file says); runs scored
    by different evaluations are no sample of one quantity, so they are refused."""
    by_evaluation: dict[str, list[str]] = {}
    for s in scores:
        if s.evaluation is not None:
            by_evaluation.setdefault(s.evaluation, []).append(s.where or s.label)
    if len(by_evaluation) > 1:
        mix = "; ".join(f"{e}: {', '.join(where)}" for e, where in by_evaluation.items())
        raise RecordError(
            f"the {side} runs are not scored by one evaluation ({mix}); compare runs whose "
            "final score comes from the same evaluation"
        )
    return next(iter(by_evaluation), None)


def welch_df(var1: float, n1: int, var2: float, n2: int) -> float:
    """Welch-Satterthwaite degrees of freedom (scipy's *_from_stats does not report them)."""
    a, b = var1 / n1, var2 / n2
    return (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))


def welch_improvement_test(
    new: Sequence[float], ref: Sequence[float] | SummaryStats, min_improvement: float
) -> tuple[float, float, float]:
    """One-sided Welch t-test that `new` improves on `ref` (lower is better) by more than
    `min_improvement`: H0 mean(ref) - mean(new) <= D, H1 mean(ref) - mean(new) > D.

    Shifting the reference down by D turns it into a plain one-sided two-sample test of
    mean(ref - D) > mean(new). Returns (t, df, p); t > 0 means the improvement exceeds D.
    """
    new = np.asarray(new, dtype=float)
    if isinstance(ref, SummaryStats):
        result = stats.ttest_ind_from_stats(
            ref.mean - min_improvement,
            ref.std,
            ref.n,
            new.mean(),
            new.std(ddof=1),
            len(new),
            equal_var=False,
            alternative="greater",
        )
        df = welch_df(ref.std**2, ref.n, new.var(ddof=1), len(new))
    else:
        shifted_ref = np.asarray(ref, dtype=float) - min_improvement
        result = stats.ttest_ind(shifted_ref, new, equal_var=False, alternative="greater")
        df = result.df
    return float(result.statistic), float(df), float(result.pvalue)


@dataclasses.dataclass(frozen=True)
class Comparison:
    metric: str  # "val_loss" (nats) or "val_bpb"
    new: SummaryStats
    ref: SummaryStats
    new_bpb_mean: float
    ref_bpb_mean: float | None  # None when the reference is only mean/std/n
    improvement: float  # ref mean - new mean, in the metric's unit
    improvement_nats: float
    improvement_bpb: float
    min_improvement: float
    alpha: float
    t: float
    df: float
    p: float
    notes: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return METRIC_UNITS[self.metric]

    @property
    def significant(self) -> bool:
        return self.p < self.alpha  # False when p is nan

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "new_mean": self.new.mean,
            "new_std": self.new.std,
            "new_n": self.new.n,
            "ref_mean": self.ref.mean,
            "ref_std": self.ref.std,
            "ref_n": self.ref.n,
            "improvement_nats": self.improvement_nats,
            "improvement_bpb": self.improvement_bpb,
            "min_improvement": self.min_improvement,
            "alpha": self.alpha,
            "t": self.t,
            "df": self.df,
            "p": self.p,
            "significant": self.significant,
        }

    def format(self) -> str:
        u, d = self.unit, self.min_improvement
        ref_bpb = (
            f"   (val_bpb mean {self.ref_bpb_mean:.6f})" if self.ref_bpb_mean is not None else ""
        )
        verdict = (
            f"significant: improves by at least {d:g} {u} (p = {self.p:.3g} < {self.alpha:g})"
            if self.significant
            else f"not significant: an improvement of at least {d:g} {u} is not shown "
            f"(p = {self.p:.3g}, needs < {self.alpha:g})"
        )
        lines = [
            f"Welch's t-test, one-sided, on {self.metric} ({u}): "
            f"H0 ref - new <= {d:g} {u}, H1 ref - new > {d:g} {u}",
            f"new        n={self.new.n:<3d} mean {self.new.mean:.6f}  std {self.new.std:.6f}"
            f"   (val_bpb mean {self.new_bpb_mean:.6f})",
            f"reference  n={self.ref.n:<3d} mean {self.ref.mean:.6f}  std "
            f"{self.ref.std:.6f}{ref_bpb}",
            f"improvement (ref - new): {self.improvement_nats:.6f} nats = "
            f"{self.improvement_bpb:.6f} bpb",
            f"t = {self.t:.4f}  df = {self.df:.2f}  p = {self.p:.4g}",
            f"verdict: {verdict}",
        ]
        return "\n".join([*lines, *(f"note: {n}" for n in self.notes)])


def compare(
    new: Sequence[Score],
    ref: Sequence[Score] | SummaryStats,
    *,
    metric: str = "val_loss",
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
    alpha: float = DEFAULT_ALPHA,
    notes: Sequence[str] = (),
) -> Comparison:
    """Test whether `new` improves on `ref` by at least `min_improvement` (in the metric's
    unit). A SummaryStats reference is in the metric's unit. The runs of each side must be
    scored by one evaluation (`one_evaluation`); the two sides may differ, which is noted."""
    if metric not in METRIC_UNITS:
        raise RecordError(f"metric {metric!r} is not one of {', '.join(METRIC_UNITS)}")
    skipped = f" ({len(notes)} left out: {'; '.join(notes)})" if notes else ""
    notes = list(notes)
    new_values = [getattr(s, metric) for s in new]
    if len(new_values) < 2:
        raise RecordError(
            f"Welch's t-test needs at least 2 new runs, got {len(new_values)}{skipped}"
        )
    new_evaluation = one_evaluation(new, "new")
    # val_bpb = val_loss / ln 2 * tokens/bytes: the same factor for every run on one val set.
    bpb_per_nat = statistics.fmean(s.val_bpb / s.val_loss for s in new)
    if isinstance(ref, SummaryStats):
        ref_stats, ref_bpb_mean = ref, None
        if ref.n < 2 or not ref.std >= 0:
            raise RecordError(
                f"the reference needs n >= 2 and std >= 0, got n={ref.n}, std={ref.std}"
            )
        ref_values: Sequence[float] | SummaryStats = ref
    else:
        ref_values = [getattr(s, metric) for s in ref]
        if len(ref_values) < 2:
            raise RecordError(
                f"Welch's t-test needs at least 2 reference runs, got {len(ref_values)}{skipped}"
            )
        ref_evaluation = one_evaluation(ref, "reference")
        if new_evaluation and ref_evaluation and new_evaluation != ref_evaluation:
            notes.append(
                f"the new runs are scored by {new_evaluation}, the reference by {ref_evaluation}"
            )
        ref_stats = SummaryStats(*_mean_std(ref_values), len(ref_values))
        ref_bpb_mean = statistics.fmean(s.val_bpb for s in ref)
        ref_ratio = statistics.fmean(s.val_bpb / s.val_loss for s in ref)
        if abs(ref_ratio / bpb_per_nat - 1) > 1e-3:
            notes.append(
                f"bpb per nat differs between new ({bpb_per_nat:.5f}) and reference "
                f"({ref_ratio:.5f}): different tokenizer or validation text, so "
                "nats are not comparable; use --metric val_bpb"
            )
    new_stats = SummaryStats(*_mean_std(new_values), len(new_values))
    t, df, p = welch_improvement_test(new_values, ref_values, min_improvement)
    improvement = ref_stats.mean - new_stats.mean
    nats = improvement if metric == "val_loss" else improvement / bpb_per_nat
    return Comparison(
        metric=metric,
        new=new_stats,
        ref=ref_stats,
        new_bpb_mean=statistics.fmean(s.val_bpb for s in new),
        ref_bpb_mean=ref_bpb_mean,
        improvement=improvement,
        improvement_nats=nats,
        improvement_bpb=nats * bpb_per_nat,
        min_improvement=min_improvement,
        alpha=alpha,
        t=t,
        df=df,
        p=p,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------
# Sweeps and plots
# ---------------------------------------------------------------------------------------


def find_summaries(
    root: Path,
) -> tuple[list[tuple[Path, dict]], list[Path], list[tuple[Path, str]]]:
    """Every finished run's summary under `root`; the train logs without one that are still
    unfinished; and the failed runs (an `error:` line in the log, or a summary without a finite
    score) with the reason."""
    summaries, failed = [], []
    for path in files_under(root, "*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if is_run_summary(data):
            try:
                summaries.append((path, check_score(data, path)))
            except RecordError:
                failed.append((path, f"val_bpb is {data.get('val_bpb')}"))
    unfinished = []
    for p in files_under(root, "*.txt"):
        if run_paths(p)[1].is_file() or p.read_bytes()[:11] != b"code_begin ":
            continue
        error = failure_line(split_log(p)[1])
        if error:
            failed.append((p, error[:160]))
        else:
            unfinished.append(p)
    return summaries, unfinished, failed


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return env_value(value)
    return str(value)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False
) -> str:
    if markdown:
        return _markdown_table(headers, rows)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def sweep_table(root: str | os.PathLike, markdown: bool = False) -> str:
    """Every run under `root` sorted by final val_bpb, with the settings that differ."""
    root = Path(root)
    if not root.is_dir():
        raise failed_run_error(root) or RecordError(f"{root}: no such folder")
    summaries, unfinished, failed = find_summaries(root)
    if not summaries:
        raise RecordError(
            f"{root}: no run summaries of finished runs (*.json written by train_gpt.py) under it"
            + "".join(f"\n  failed: {p} ({why})" for p, why in failed)
        )
    runs = sorted((s for _, s in summaries), key=lambda s: s["val_bpb"])
    keys = sorted({k for s in runs for k in s["hyperparameters"]} - {"RUN_ID", "PRESET"})
    differing = [
        k
        for k in keys
        if len({json.dumps(s["hyperparameters"].get(k, "<unset>")) for s in runs}) > 1
    ]
    show_code = len({s["code_sha256"] for s in runs}) > 1
    headers = [
        "run_id",
        "preset",
        *(["code"] if show_code else []),
        *differing,
        "val_bpb",
        "bytes_total",
        "fits",
        "steps",
        "step_avg_ms",
    ]
    rows = [
        [
            str(s["run_id"]),
            s["hyperparameters"].get("PRESET") or "-",
            *([s["code_sha256"][:8]] if show_code else []),
            *(_cell(s["hyperparameters"].get(k)) for k in differing),
            f"{s['val_bpb']:.4f}",
            f"{s['bytes_total']:,}",
            "yes" if s["fits"] else "NO",
            str(s["steps"]),
            f"{s['step_avg_ms']:.2f}",
        ]
        for s in runs
    ]
    text = format_table(headers, rows, markdown)
    if unfinished:
        text += "\n\nnot finished (no summary): " + ", ".join(str(p) for p in unfinished)
    if failed:
        text += "\n\nfailed (not ranked):\n" + "\n".join(f"  {p}: {why}" for p, why in failed)
    return text


# Curves leave out step 0: the untrained model's val_bpb would squash the rest of the plot.
@dataclasses.dataclass(frozen=True)
class Curve:
    label: str
    steps: list[int]
    train_time_s: list[float]
    val_bpb: list[float]


def _curve_from_summary(summary: dict) -> Curve:
    history = [h for h in summary["val_history"] if h["step"] > 0]
    return Curve(
        label=f"{summary['run_id']} (final {summary['val_bpb']:.4f})",
        steps=[h["step"] for h in history],
        train_time_s=[h["train_time_ms"] / 1000 for h in history],
        val_bpb=[h["val_bpb"] for h in history],
    )


def _curve_from_log(log_path: Path) -> Curve:
    """Validation points of a run that has no summary yet (still running or cut off)."""
    steps, times, bpbs = [], [], []
    for line in split_log(log_path)[1]:
        f = fields(line)
        if "step" in f and "val_bpb" in f and "train_time" in f and not f["step"].startswith("0/"):
            steps.append(int(f["step"].split("/")[0]))
            times.append(float(f["train_time"].removesuffix("ms")) / 1000)
            bpbs.append(float(f["val_bpb"]))
    return Curve(f"{log_path.stem} (unfinished)", steps, times, bpbs)


def load_curves(paths: Sequence[str | os.PathLike]) -> list[Curve]:
    curves = []
    for path in map(Path, paths):
        if path.is_dir():
            summaries, unfinished, _ = find_summaries(path)
            curves += [_curve_from_summary(s) for _, s in summaries]
            curves += [_curve_from_log(p) for p in unfinished]
            continue
        log_path, summary_path = run_paths(path)
        if summary_path.is_file():
            curves.append(_curve_from_summary(read_summary(summary_path)))
        elif log_path.is_file():
            curves.append(_curve_from_log(log_path))
        else:
            raise failed_run_error(path) or RecordError(
                f"{path}: no such run (neither {log_path} nor {summary_path})"
            )
    return curves


def plot_runs(paths: Sequence[str | os.PathLike], out_png: str | os.PathLike) -> Path:
    """Write a PNG of val_bpb against training time and against step, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RecordError(
            "plotting needs matplotlib (pip install matplotlib); the other commands do not"
        ) from err
    curves = [c for c in load_curves(paths) if c.steps]
    if not curves:
        raise RecordError("no validation points to plot in " + ", ".join(map(str, paths)))
    out_png = Path(out_png)
    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for curve in curves:
        by_time.plot(curve.train_time_s, curve.val_bpb, marker=".", label=curve.label)
        by_step.plot(curve.steps, curve.val_bpb, marker=".", label=curve.label)
    by_time.set_xlabel("training time (s)")
    by_step.set_xlabel("step")
    by_time.set_ylabel("val_bpb (before quantization)")
    for ax in (by_time, by_step):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize="small", loc="upper right")
    fig.suptitle("validation bpb during training; legend: final score")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(out_png, png.getvalue())
    return out_png
