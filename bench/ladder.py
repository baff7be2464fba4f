"""CPU technique ladder: each row of bench/ladder_rows.txt trained at one fixed small configuration.

    OMP_NUM_THREADS=2 python bench/ladder.py             # every row, seeds 1337 and 1338
    OMP_NUM_THREADS=2 python bench/ladder.py --rows baseline,qat_off
    python bench/ladder.py --list                        # the rows and what is stored for them

A run takes about 4 minutes on an idle 2-core CPU with OMP_NUM_THREADS=2 (0.8 s a step, 1 min of
evaluation). While other work shares the machine, OMP_NUM_THREADS=1 is faster (two threads then wait
on each other): 7-10 minutes a run here.

A row is `name: KEY=VALUE ...` (train_gpt.py settings on top of the fixed configuration); the first
row is `baseline:` with none. A row `name: @base KEY=VALUE ...` trains nothing: it re-exports and
re-scores the raw weights of row `base`'s run with the same seed (ITERATIONS=0 INIT_CHECKPOINT=...),
for switches of the export and the evaluation (quantization, compression, test-time training); its
delta is then that switch alone. --jobs 2 runs two at a time (give each OMP_NUM_THREADS=1). Each
(row, seed) result is stored in bench/ladder_results.json with the row's settings and the
configuration it ran with; a stored result is reused while both are unchanged, and run again when
either changed (or with --rerun). bench/LADDER.md is regenerated from the stored results after every
run. Runs are step-based, so scores do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlog  # noqa: E402
from runlog import ROOT, TRAINER, display  # noqa: E402

RESULTS_FORMAT = "pgolf-ladder"
DEFAULT_SEEDS = (1337, 1338)
BASELINE = "baseline"
HARNESS_KEYS = ("RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "SEED")  # the ladder sets these per run
# 6x128 (1.0M parameters); 150 steps x 4,096 tokens = 0.20 epochs of the 3.05M training tokens
FIXED_CONFIG = {
    "DATA_PATH": "data/datasets/pydocs_sp1024",
    "TOKENIZER_PATH": "data/tokenizers/pydocs_1024_bpe.model",
    "VOCAB_SIZE": "1024",
    "DEVICE": "cpu",
    "NUM_LAYERS": "6",
    "MODEL_DIM": "128",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "256",
    "TRAIN_BATCH_TOKENS": "4096",
    "GRAD_ACCUM_STEPS": "1",
    "ITERATIONS": "150",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "2",
    "WARMDOWN_ITERS": "45",
    "MUON_MOMENTUM_WARMUP_STEPS": "45",
    "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "50",
    "VAL_BATCH_SIZE": "65536",
    "EVAL_STRIDE": "128",
    "ZSTD_LEVEL": "22",
}
CAN_SHOW = (
    "**What it can show**: that a switch works end to end at this scale (it trains, exports, "
    "reloads and scores) and does not hurt here, and what it costs in step time and artifact bytes."
)
CANNOT_SHOW = (
    "**What it cannot show**: gains on FineWeb. A 1M-parameter model trained on 0.6M tokens of "
    "Python documentation is not the challenge's 22M-parameter model trained on billions of tokens "
    "of web text; a technique that pays off only at scale, or only on FineWeb, looks neutral or "
    "worse here, and the reverse. With two seeds the ± (the standard error of the delta) is itself "
    "rough: a delta within about twice its ± is noise."
)


# -----------------------------------------------------------------------------
# Rows and configuration
# -----------------------------------------------------------------------------


def read_rows(path: Path) -> dict[str, dict]:
    """Rows in file order: name -> settings. Stops naming the file and line of the first bad row."""
    if not path.is_file():
        raise SystemExit(f"error: rows file {display(path)} does not exist; give --rows-file")
    rows: dict[str, dict] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{display(path)}:{number}"
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SystemExit(
                f"error: {where}: expected `name: KEY=VALUE ...` with a name of letters, digits, "
                f"_ . - (got {raw.strip()!r})"
            )
        if name in rows:
            raise SystemExit(f"error: {where}: row {name!r} is defined twice")
        words = shlex.split(rest)
        base = words.pop(0)[1:] if words and words[0].startswith("@") else None
        if base is not None and base not in rows:
            raise SystemExit(f"error: {where}: @{base} must name an earlier row")
        env = runlog.parse_assignments(words, where)
        if base is not None:
            env = {"@": base, **env}
        if taken := sorted(set(env) & set(HARNESS_KEYS)):
            raise SystemExit(
                f"error: {where}: {', '.join(taken)} is set by the ladder itself (seeds: --seeds)"
            )
        rows[name] = env
    if not rows or next(iter(rows)) != BASELINE or rows[BASELINE]:
        raise SystemExit(
            f"error: {display(path)}: the first row must be `{BASELINE}:` with no settings "
            "(every delta is taken against it)"
        )
    return rows


def build_config(args) -> dict:
    config = dict(FIXED_CONFIG)
    for flag, key in (
        ("data_path", "DATA_PATH"),
        ("tokenizer_path", "TOKENIZER_PATH"),
        ("vocab_size", "VOCAB_SIZE"),
    ):
        if getattr(args, flag) is not None:
            config[key] = str(getattr(args, flag))
    config.update(runlog.parse_assignments(args.set, "--set"))
    return config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", help="comma-separated row names to run (default: all)")
    p.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="comma-separated seeds (default 1337,1338)",
    )
    p.add_argument(
        "--list", action="store_true", help="show the rows and their stored results, run nothing"
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="run the selected rows even if their results are current",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the fixed configuration (results are then stored as a different "
        "configuration)",
    )
    p.add_argument("--data-path", help="shard folder (default: data/datasets/pydocs_sp1024)")
    p.add_argument(
        "--tokenizer-path",
        help="SentencePiece model (default: data/tokenizers/pydocs_1024_bpe.model)",
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary size (default 1024)")
    p.add_argument("--rows-file", type=Path, default=ROOT / "bench" / "ladder_rows.txt")
    p.add_argument(
        "--results",
        type=Path,
        default=ROOT / "bench" / "ladder_results.json",
        help="stored results (default: bench/ladder_results.json)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "LADDER.md",
        help="the table (default: bench/LADDER.md)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "bench" / "out" / "ladder",
        help="logs and artifacts of the runs (default: bench/out/ladder/)",
    )
    p.add_argument(
        "--timeout-min", type=float, default=20.0, help="kill a run after this long (default 20)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"error: --seeds {args.seeds!r}: give comma-separated integers, e.g. 1337,1338"
        ) from None
    if not args.seeds:
        raise SystemExit("error: --seeds is empty")
    return args


def select_rows(rows: dict, wanted: str | None) -> list[str]:
    if wanted is None:
        return list(rows)
    names = [x.strip() for x in wanted.split(",") if x.strip()]
    unknown = [x for x in names if x not in rows]
    if unknown or not names:
        raise SystemExit(
            f"error: --rows: no row {', '.join(unknown) or '(empty)'} in the rows file; rows are: "
            f"{', '.join(rows)}"
        )
    return [name for name in rows if name in names]


# -----------------------------------------------------------------------------
# Stored results
# -----------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    return runlog.read_json(path, RESULTS_FORMAT) or {
        "format": RESULTS_FORMAT,
        "version": 1,
        "runs": {},
    }


def is_current(entry: dict | None, row_env: dict, config: dict, trainer_sha: str) -> bool:
    """A stored result stands for this row while its settings and the configuration are unchanged; a
    failure stands only while the trainer is the same too (a new trainer may have fixed it)."""
    if entry is None or entry["row_env"] != row_env or entry["config"] != config:
        return False
    return entry["status"] == "ok" or entry["trainer_sha256"] == trainer_sha


def store(results: dict, path: Path, row: str, seed: int, entry: dict) -> None:
    results["runs"].setdefault(row, {})[str(seed)] = entry
    runlog.write_text_atomic(path, json.dumps(results, indent=2, sort_keys=False) + "\n")


# -----------------------------------------------------------------------------
# Running one (row, seed)
# -----------------------------------------------------------------------------


class Ladder:
    def __init__(self, args, config: dict, command: str, trainer_sha: str, results: dict):
        self.args, self.config, self.command, self.trainer_sha = args, config, command, trainer_sha
        self.results = results
        # described on the first run (a child process imports torch)
        self.machine: str | None = None
        self.known_settings: dict = {}  # the trainer's settings, once one run has logged them

    def run(self, row: str, row_env: dict, seed: int) -> dict:
        self.machine = self.machine or machine_line(runlog.describe_machine())
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id = f"ladder-{row}-s{seed}-{stamp}"
        work = self.args.work_dir.resolve()
        settings = {k: v for k, v in row_env.items() if k != "@"}
        env = {
            **self.config,
            **settings,
            "SEED": str(seed),
            "RUN_ID": run_id,
            "LOG_DIR": str(work / "logs"),
            "ARTIFACT_DIR": str(work / "artifacts"),
        }
        entry = {
            "row_env": row_env,
            "config": self.config,
            "status": "failed",
            "error": None,
            "figures": None,
            "date": datetime.date.today().isoformat(),
            "machine": self.machine,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "trainer_sha256": self.trainer_sha,
            "command": self.command,
            "run_id": run_id,
            "wall_s": None,
            "cpu_s": None,
        }
        if error := runlog.unread_settings_error(settings, self.known_settings):
            return {**entry, "error": error}  # known without running it
        if "@" in row_env:  # re-export the base row's trained weights
            base = self.results["runs"].get(row_env["@"], {}).get(str(seed))
            raw = work / "artifacts" / f"{base['run_id']}_raw.pt" if base else None
            if raw is None or base["status"] != "ok" or not raw.is_file():
                return {
                    **entry,
                    "error": f"row {row_env['@']} seed {seed} has no raw checkpoint under "
                    f"{display(work / 'artifacts')}; run --rows {row_env['@']} first",
                }
            env.update(ITERATIONS="0", INIT_CHECKPOINT=str(raw))
        timeout_s = 60 * self.args.timeout_min
        outcome = runlog.run_trainer(
            runlog.trainer_command(TRAINER, 1),
            env,
            cwd=ROOT,
            timeout_s=timeout_s,
            transcript_path=work / "transcripts" / f"{run_id}.out",
        )
        log = runlog.parse_log(outcome.transcript, work / "logs" / f"{run_id}.txt")
        self.known_settings = self.known_settings or log.settings
        error = runlog.failure_reason(outcome, log, timeout_s) or runlog.unread_settings_error(
            settings, log.settings
        )
        return {
            **entry,
            "status": "failed" if error else "ok",
            "error": error,
            "figures": ladder_figures(log),
            "wall_s": round(outcome.wall_s, 1),
            "cpu_s": round(outcome.cpu_s, 1),
        }


def loop_step_ratio(log: runlog.TrainerLog) -> float | None:
    """Step time after the loops switched on over the step time before."""
    if not log.looping_on or not log.steps or log.train_time_ms is None:
        return None
    (step, ms), total = log.looping_on, log.train_time_ms
    return (
        ((total - ms) / (log.steps - step)) / (ms / step)
        if 0 < step < log.steps and ms > 0
        else None
    )


def ladder_figures(log: runlog.TrainerLog) -> dict:
    return {
        "val_bpb": log.final_val_bpb,
        "sliding_val_bpb": log.sliding_val_bpb,
        "ttt_val_bpb": log.ttt_val_bpb,
        "loop_step_ratio": loop_step_ratio(log),
        "prequant_val_bpb": log.prequant_val_bpb,
        "roundtrip_val_bpb": log.roundtrip_val_bpb,
        "quant_penalty_bpb": log.quant_penalty_bpb,
        "bytes_total": log.bytes_total,
        "step_avg_ms": log.train_time_ms / log.steps
        if log.steps and log.train_time_ms is not None
        else None,
        "steps": log.steps,
        "data_epochs": log.data_epochs,
        "sliding_eval_ms": log.sliding_eval_ms,
        "roundtrip_eval_ms": log.roundtrip_eval_ms,
        "export_ms": log.export_ms,
        "ttt_eval_ms": log.ttt_eval_ms,
    }


def machine_line(machine: dict) -> str:
    return (
        f"{machine['device']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
        f"Python {machine['python']}"
    )


# -----------------------------------------------------------------------------
# LADDER.md
# -----------------------------------------------------------------------------


def row_stats(entries: dict[str, dict]) -> dict | None:
    """Means over the successful seeds of a row (None when there are none)."""
    ok = {seed: e for seed, e in entries.items() if e["status"] == "ok"}
    if not ok:
        return None
    figures = [e["figures"] for e in ok.values()]
    mean, std = runlog.mean_std([f["val_bpb"] for f in figures])
    cpu = [e.get("cpu_s") for e in ok.values()]
    return {
        "n": len(ok),
        "mean": mean,
        "std": std,
        "scores": {s: e["figures"]["val_bpb"] for s, e in ok.items()},
        "step_ms": mean_of(figures, "step_avg_ms"),
        "penalty": mean_of(figures, "quant_penalty_bpb"),
        "bytes": mean_of(figures, "bytes_total"),
        "epochs": mean_of(figures, "data_epochs"),
        "cpu_s": None if None in cpu else runlog.mean_std(cpu)[0],
        "wall_s": [e["wall_s"] for e in entries.values() if e["wall_s"]],
    }


def mean_of(figures: list[dict], key: str) -> float | None:
    values = [f[key] for f in figures]
    return None if None in values else runlog.mean_std(values)[0]


def ratio(stats: dict, base: dict | None, key: str) -> float | None:
    return stats[key] / base[key] if base and stats[key] and base[key] else None


def cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def paired_delta(stats: dict, base: dict) -> tuple[float, float | None] | None:
    """(mean, standard error) of row minus baseline over the seeds both have. Runs with the same
    seed read the same batches and, when the row keeps the model's shapes, start from the same
    weights, so pairing removes most of the seed-to-seed spread the two rows share."""
    seeds = sorted(set(stats["scores"]) & set(base["scores"]))
    if not seeds:
        return None
    mean, std = runlog.mean_std([stats["scores"][s] - base["scores"][s] for s in seeds])
    return mean, None if std is None else std / len(seeds) ** 0.5


def delta_cell(stats: dict, base: dict | None, is_base: bool) -> str:
    if is_base or base is None or (delta := paired_delta(stats, base)) is None:
        return "—"
    mean, stderr = delta
    return f"{mean:+.4f}" if stderr is None else f"{mean:+.4f} ± {stderr:.4f}"


def row_notes(
    name: str, entries_by_seed: dict, current: list[dict], seeds_wanted: int, trainer_sha: str
) -> str:
    notes = []
    stale = len(entries_by_seed) - len(current)
    if not entries_by_seed:
        return "not run yet"
    if stale:
        notes.append(
            f"{stale} stale run(s), not counted: the row, the configuration or (for a failure) the "
            f"trainer changed since; re-run with --rows {name}"
        )
    for e in current:
        if e["status"] != "ok":
            notes.append(f"failed: {e['error']}")
    if current and any(e["trainer_sha256"] != trainer_sha for e in current):
        shas = sorted({e["trainer_sha256"][:10] for e in current})
        notes.append(f"measured with train_gpt.py {', '.join(shas)} (now {trainer_sha[:10]})")
    ok = [e for e in current if e["status"] == "ok"]
    loops = [e["figures"].get("loop_step_ratio") for e in ok if e["figures"].get("loop_step_ratio")]
    if loops:
        notes.append(f"step time x{sum(loops) / len(loops):.2f} once the loops run")
    ttt = [
        e["figures"]["ttt_eval_ms"] / e["figures"]["sliding_eval_ms"]
        for e in ok
        if e["figures"].get("ttt_eval_ms") and e["figures"].get("sliding_eval_ms")
    ]
    if ttt:
        notes.append(f"TTT evaluation x{sum(ttt) / len(ttt):.1f} the sliding evaluation's time")
    if ok and any(
        e["figures"]["data_epochs"] is not None and e["figures"]["data_epochs"] > 1 for e in ok
    ):
        notes.append("saw training tokens more than once (data_epochs > 1)")
    if 0 < len(ok) < seeds_wanted:
        notes.append(f"{len(ok)} of {seeds_wanted} seeds")
    return "; ".join(dict.fromkeys(notes)) or "ok"


def render_ladder(
    rows: dict,
    results: dict,
    config: dict,
    seeds: list[int],
    trainer_sha: str,
    *,
    results_path: Path,
    rows_path: Path,
) -> str:
    stored = results["runs"]
    current = {
        name: {
            seed: e
            for seed, e in stored.get(name, {}).items()
            if is_current(e, env, config, trainer_sha)
        }
        for name, env in rows.items()
    }
    stats = {name: row_stats(entries) for name, entries in current.items()}
    base = stats.get(BASELINE)
    used = [e for entries in current.values() for e in entries.values()]
    walls = [w for s in stats.values() if s for w in s["wall_s"]]
    lines = [
        "# CPU technique ladder",
        "",
        f"Regenerated by `python bench/ladder.py` from `{display(results_path)}` after every run; "
        f"do not edit by hand. The rows are in `{display(rows_path)}`.",
        "",
        CAN_SHOW,
        "",
        CANNOT_SHOW,
        "",
        "- Score: the final val_bpb (sliding window: EVAL_STRIDE below, window TRAIN_SEQ_LEN; the "
        "TTT score where TTT is on) of the artifact read back from disk, on the validation split "
        "of DATA_PATH (by default the offline dataset: 203,394 tokens of Python documentation, not "
        "FineWeb). Mean ± sample standard deviation over the seeds.",
        "- Δ: the row's score minus the baseline's for the same seed (the same batches, and the "
        "same initial weights when the row keeps the model's shapes), averaged over the seeds, ± "
        "its standard error.",
        "- Step time: the row's mean training ms/step (wall clock) over the baseline's; CPU time: "
        "the same ratio for the whole run's CPU seconds (training, export, evaluations). Other "
        "work shared the machine while these ran, which moves wall-clock times by tens of percent "
        "and CPU times much less; on a CPU neither says what a switch costs on a GPU.",
        f"- Machine: {'; '.join(sorted({e['machine'] for e in used})) or '—'}; OMP_NUM_THREADS "
        f"{', '.join(sorted({str(e['omp_num_threads']) for e in used})) or '—'}.",
        "- Command(s): "
        f"{', '.join(f'`{c}`' for c in sorted({e['command'] for e in used})) or '—'}.",
        "- Trainer: train_gpt.py sha256 "
        f"{', '.join(sorted({e['trainer_sha256'][:12] for e in used})) or '—'} (now "
        f"{trainer_sha[:12]}).",
        f"- Per run (training, export and the three evaluations): "
        f"{f'{min(walls) / 60:.1f}–{max(walls) / 60:.1f} min wall time' if walls else '—'}.",
        "- Fixed configuration: `"
        + " ".join(f"{k}={v}" for k, v in config.items())
        + "`; seeds "
        + ", ".join(map(str, seeds))
        + ".",
        "",
        "| row | settings | seeds | val_bpb (mean ± std) | Δ vs baseline (paired) "
        "| step time / baseline | CPU time / baseline | quant penalty | artifact bytes "
        "| data epochs | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, env in rows.items():
        s = stats[name]
        settings = " ".join(f"@{v}" if k == "@" else f"{k}={v}" for k, v in env.items()) or "(none)"
        notes = row_notes(
            name, stored.get(name, {}), list(current[name].values()), len(seeds), trainer_sha
        )
        if s is None:
            lines.append(f"| {name} | `{settings}` | 0 | — | — | — | — | — | — | — | {notes} |")
            continue
        spread = f" ± {s['std']:.4f}" if s["std"] is not None else ""
        lines.append(
            f"| {name} | `{settings}` | {s['n']} | {s['mean']:.4f}{spread} | "
            f"{delta_cell(s, base, name == BASELINE)} | {cell(ratio(s, base, 'step_ms'), '.2f')} | "
            f"{cell(ratio(s, base, 'cpu_s'), '.2f')} | {cell(s['penalty'], '+.4f')} | "
            f"{cell(s['bytes'], ',.0f')} | {cell(None if '@' in env else s['epochs'], '.2f')} | "
            f"{notes} |"
        )
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


def list_rows(rows: dict, results: dict, config: dict, trainer_sha: str) -> None:
    for name, env in rows.items():
        entries = results["runs"].get(name, {})
        states = [
            f"seed {seed}: {e['status'] if is_current(e, env, config, trainer_sha) else 'stale'}"
            for seed, e in entries.items()
        ]
        settings = " ".join(f"@{v}" if k == "@" else f"{k}={v}" for k, v in env.items())
        print(f"{name}: {settings or '(no settings)'}  [{', '.join(states) or 'not run yet'}]")


def write_ladder(args, rows: dict, results: dict, config: dict, trainer_sha: str) -> None:
    text = render_ladder(
        rows,
        results,
        config,
        args.seeds,
        trainer_sha,
        results_path=args.results,
        rows_path=args.rows_file,
    )
    runlog.write_text_atomic(args.out, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows = read_rows(args.rows_file)
    config = build_config(args)
    results = load_results(args.results)
    trainer_sha = hashlib.sha256(TRAINER.read_bytes()).hexdigest()
    if args.list:
        list_rows(rows, results, config, trainer_sha)
        return 0
    selected = select_rows(rows, args.rows)
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={threads}"] if threads else []
    command = shlex.join(prefix + ["python", display(Path(__file__)), *argv])
    ladder = Ladder(args, config, command, trainer_sha, results)
    lock = threading.Lock()

    def run_one(name: str, seed: int) -> None:
        print(f"{name} seed {seed}: running", flush=True)
        entry = ladder.run(name, rows[name], seed)
        with lock:
            store(results, args.results, name, seed, entry)
            write_ladder(args, rows, results, config, trainer_sha)
        score = entry["figures"]["val_bpb"] if entry["figures"] else None
        print(
            f"{name} seed {seed}: {entry['status']}"
            + (f" val_bpb {score:.4f}" if score is not None else "")
            + (f" ({entry['error']})" if entry["error"] else "")
            + (f" in {entry['wall_s']:.0f}s" if entry["wall_s"] else ""),
            flush=True,
        )

    todo = []
    for name in selected:
        for seed in args.seeds:
            entry = results["runs"].get(name, {}).get(str(seed))
            if not args.rerun and is_current(entry, rows[name], config, trainer_sha):
                print(
                    f"{name} seed {seed}: stored result is current ({entry['status']}), kept",
                    flush=True,
                )
            else:
                todo.append((name, seed))
    # re-export rows wait for the weights they need
    trained = [job for job in todo if "@" not in rows[job[0]]]
    for batch in (trained, [job for job in todo if job not in trained]):
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda job: run_one(*job), batch))
    write_ladder(args, rows, results, config, trainer_sha)
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
