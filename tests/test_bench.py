"""bench/: the GPU harness end to end on CPU (its dry run, merged results, RESULTS.md, the dataset
build), the technique ladder on tiny rows (mean ± std, deltas, stale and failing rows), and the log
reader on both formats."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_env

sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402
import ladder  # noqa: E402
import runlog  # noqa: E402

TINY_MODEL_KEYS = (
    "NUM_LAYERS",
    "MODEL_DIM",
    "NUM_HEADS",
    "NUM_KV_HEADS",
    "MLP_MULT",
    "TRAIN_SEQ_LEN",
    "TRAIN_BATCH_TOKENS",
    "VAL_BATCH_SIZE",
    "ITERATIONS",
    "WARMUP_STEPS",
    "WARMDOWN_ITERS",
    "ZSTD_LEVEL",
    "TRAIN_LOG_EVERY",
)


def bench(script: str, *args, status: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    """A bench command as a user runs it from the repo root, with no data variables from outside."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == status, (
        f"{script} exited ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def data_args(tiny_data: dict) -> list[str]:
    return [
        "--data-path",
        tiny_data["data_path"],
        "--tokenizer-path",
        tiny_data["tokenizer_path"],
        "--vocab-size",
        tiny_data["vocab_size"],
    ]


def table_rows(markdown: str) -> list[dict[str, str]]:
    """Body rows of the markdown table, as {column header: cell}."""
    rows = [
        line
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ]
    header, *body = [[c.strip() for c in row.strip().strip("|").split(" | ")] for row in rows]
    assert all(len(cells) == len(header) for cells in body)
    return [dict(zip(header, cells, strict=True)) for cells in body]


# -----------------------------------------------------------------------------
# gpu_bench.py
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tiny_data, tmp_path_factory) -> dict:
    """One dry run of every part; the peer is train_gpt.py itself (run through its environment)."""
    out = tmp_path_factory.mktemp("gpu_bench")
    proc = bench(
        "gpu_bench.py",
        "--dry-run",
        "--peer",
        ROOT / "train_gpt.py",
        "--minutes",
        "0.03",
        *data_args(tiny_data),
        "--results-dir",
        out / "results_dir",
        "--work-dir",
        out / "work",
    )
    path = Path(proc.stdout.strip().splitlines()[-1])
    return {
        "out": out,
        "path": path,
        "results": json.loads(path.read_text()),
        "stdout": proc.stdout,
    }


def test_dry_run_measures_every_figure(dry_run, tiny_data):
    path, results = dry_run["path"], dry_run["results"]
    assert path.parent == dry_run["out"] / "results_dir" / "results"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_cpu-[a-z0-9-]+\.json", path.name)
    (inv,) = results["invocations"]
    assert (
        inv["dry_run"]
        and "--dry-run" in inv["command"]
        and inv["command"].startswith("python bench/gpu_bench.py")
    )
    assert inv["machine"]["gpu_count"] == 0 and inv["machine"]["torch"] and inv["machine"]["python"]
    assert re.fullmatch(r"[0-9a-f]{40}", inv["checkout"]["commit"]) and isinstance(
        inv["checkout"]["dirty"], bool
    )
    assert inv["data"]["val_tokens"] == tiny_data["val_tokens"]
    assert inv["data"]["train_tokens"] == tiny_data["train_tokens"]
    assert not inv["data"]["fineweb"] and "not FineWeb" in inv["data"]["note"]
    assert [m["part"] for m in results["measurements"]] == ["throughput", "run", "peer"]
    assert all(m["status"] == "ok" and m["error"] is None for m in results["measurements"])

    throughput, run, peer = (m["figures"] for m in results["measurements"])
    # 2 settling + 6 timed, after warm-up
    assert throughput["timed_steps"] == 6 and throughput["steps"] == 8
    assert (
        throughput["ms_per_step"] > 0
        and throughput["warmup_ms"] >= 0
        and throughput["peak_rss_mib"] > 0
    )
    assert throughput["tokens_per_s"] == pytest.approx(4096 / throughput["ms_per_step"] * 1000)
    assert throughput["mfu"] is None  # no known peak on a CPU
    # FINAL_EVAL=0
    assert throughput["sliding_val_bpb"] is None and throughput["bytes_total"] is None
    for f in (run, peer):
        for key in (
            "ms_per_step",
            "tokens_per_s",
            "steps",
            "data_epochs",
            "prequant_val_bpb",
            "roundtrip_val_bpb",
            "sliding_val_bpb",
            "quant_penalty_bpb",
            "bytes_total",
            "export_ms",
            "sliding_tok_s",
            "roundtrip_eval_ms",
            "sliding_eval_ms",
            "peak_rss_mib",
            "warmup_ms",
        ):
            assert f[key] is not None, key
        assert 0 < f["data_epochs"] < 1 and f["steps"] > 2 and f["bytes_total"] > 0
        assert f["final_val_bpb"] == f["sliding_val_bpb"]
        assert f["quant_penalty_bpb"] == pytest.approx(
            f["roundtrip_val_bpb"] - f["prequant_val_bpb"], abs=1e-4
        )
        assert f["projected_fineweb_8gpu_s"] is None  # projected only on CUDA


def test_results_md_is_regenerated_with_ratios_to_the_peer(dry_run):
    text = (dry_run["out"] / "results_dir" / "RESULTS.md").read_text()
    assert "Measured: every figure except the projected 8-GPU evaluation time" in text
    rows = table_rows(text)
    assert [r["part"] for r in rows] == ["throughput", "run", "peer"]
    assert all("(dry run)" in r["command"] and "not FineWeb" in r["data"] for r in rows)
    assert all(r["attention, compile"] == "math, eager" for r in rows)
    assert rows[1]["8-GPU FineWeb eval (projected)"] == "not projected (CPU)"
    # eager on CPU
    assert rows[1]["eval graphs, compile (round trip + sliding)"] == "0 + 0 graphs, 0.0 + 0.0 s"
    run, peer = (m["figures"] for m in dry_run["results"]["measurements"][1:])
    assert rows[2]["ours/peer"] == (
        f"ms/step {run['ms_per_step'] / peer['ms_per_step']:.3f} · "
        f"val_bpb {run['final_val_bpb'] / peer['final_val_bpb']:.3f} · "
        f"bytes {run['bytes_total'] / peer['bytes_total']:.3f}"
    )
    assert rows[1]["sliding val_bpb"] == f"{run['sliding_val_bpb']:.4f}"
    assert rows[1]["artifact bytes"] == f"{run['bytes_total']:,}"


def test_a_second_invocation_keeps_earlier_measurements(dry_run, tiny_data):
    before = dry_run["results"]
    proc = bench(
        "gpu_bench.py",
        "--dry-run",
        "--only",
        "throughput",
        "--steps",
        "3",
        "--presets",
        "nosuch",
        *data_args(tiny_data),
        "--results-dir",
        dry_run["out"] / "results_dir",
        "--work-dir",
        dry_run["out"] / "work",
        status=gpu_bench.PART_FAILED_STATUS,
    )
    assert Path(proc.stdout.strip().splitlines()[-1]) == dry_run["path"]
    after = json.loads(dry_run["path"].read_text())
    assert after["invocations"][0] == before["invocations"][0] and len(after["invocations"]) == 2
    assert after["measurements"][:3] == before["measurements"]
    default, preset = after["measurements"][3:]
    assert default["status"] == "ok" and default["figures"]["timed_steps"] == 3
    assert preset["status"] == "failed" and "PRESET" in preset["error"]  # recorded, not a crash
    rows = table_rows((dry_run["out"] / "results_dir" / "RESULTS.md").read_text())
    assert len(rows) == 5 and rows[4]["status"].startswith("failed: ") and rows[3]["status"] == "ok"


def test_dry_run_builds_the_offline_dataset_and_records_a_rejected_config(tmp_path):
    proc = bench(
        "gpu_bench.py",
        "--dry-run",
        "--only",
        "throughput",
        "--data-root",
        tmp_path / "data",
        "--results-dir",
        tmp_path / "results_dir",
        "--work-dir",
        tmp_path / "work",
        "NUM_HEADS=3",
        status=gpu_bench.PART_FAILED_STATUS,
    )
    assert (tmp_path / "data" / "datasets" / "pydocs_sp1024" / "fineweb_val_000000.bin").is_file()
    assert (tmp_path / "data" / "tokenizers" / "pydocs_1024_bpe.model").is_file()
    results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    data = results["invocations"][0]["data"]
    assert data["name"] == "pydocs_sp1024" and data["vocab_size"] == 1024 and not data["fineweb"]
    assert data["val_tokens"] > 100_000 and data["train_tokens"] > 1_000_000
    (m,) = results["measurements"]
    assert (
        m["status"] == "failed"
        and "NUM_HEADS=3" in m["error"]
        and m["config"] == "default NUM_HEADS=3"
    )


def test_gpu_bench_refuses_bad_arguments_in_one_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, needle in (
        (["--dry-run", "--nproc", "3"], "--nproc 3"),
        (["--dry-run", "--only", "speed"], "--only"),
        (["--dry-run", "--only", "peer"], "--peer"),
        (["--dry-run", "lowercase=1"], "KEY=VALUE"),
    ):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (
            proc.returncode != 0
            and proc.stderr.strip().startswith("error: ")
            and needle in proc.stderr
        )
        assert len(proc.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# ladder.py
# -----------------------------------------------------------------------------


def ladder_args(tiny_data: dict, tmp_path: Path, rows: Path) -> list:
    tiny = tiny_env(tiny_data, tmp_path, TRAIN_LOG_EVERY="2")
    sets = [a for key in TINY_MODEL_KEYS for a in ("--set", f"{key}={tiny[key]}")]
    return [
        "--rows-file",
        rows,
        "--results",
        tmp_path / "ladder.json",
        "--out",
        tmp_path / "LADDER.md",
        "--work-dir",
        tmp_path / "work",
        "--seeds",
        "1,2",
        "--set",
        "EVAL_STRIDE=32",
        *sets,
        *data_args(tiny_data),
    ]


def ladder_table(path: Path) -> dict[str, dict[str, str]]:
    return {row["row"]: row for row in table_rows(path.read_text())}


def test_ladder_rows_seeds_deltas_stale_and_failed_rows(tiny_data, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text(
        "# tiny ladder\nbaseline:\nno_smear: SMEAR_GATE=0   # a switch that exists\n"
        "bad: NUM_HEADS=3\n"
    )
    args = ladder_args(tiny_data, tmp_path, rows)
    bench("ladder.py", *args)
    stored = json.loads((tmp_path / "ladder.json").read_text())["runs"]
    assert sorted(stored) == ["bad", "baseline", "no_smear"] and all(
        sorted(s) == ["1", "2"] for s in stored.values()
    )
    for name in ("baseline", "no_smear"):
        for seed in ("1", "2"):
            e = stored[name][seed]
            assert (
                e["status"] == "ok" and e["figures"]["val_bpb"] == e["figures"]["sliding_val_bpb"]
            )
            assert e["config"]["NUM_LAYERS"] == "2" and re.fullmatch(
                r"[0-9a-f]{64}", e["trainer_sha256"]
            )
            assert 0 < e["figures"]["data_epochs"] <= 1 and e["figures"]["steps"] == 6
            assert e["wall_s"] > 0 and e["cpu_s"] > 0
    assert stored["no_smear"]["1"]["row_env"] == {"SMEAR_GATE": "0"}
    # the two seeds differ
    assert (
        stored["baseline"]["1"]["figures"]["val_bpb"]
        != stored["baseline"]["2"]["figures"]["val_bpb"]
    )
    assert all(
        e["status"] == "failed" and "NUM_HEADS=3" in e["error"] for e in stored["bad"].values()
    )

    table = ladder_table(tmp_path / "LADDER.md")
    runs = {name: [stored[name][seed] for seed in ("1", "2")] for name in ("baseline", "no_smear")}
    base_mean, base_std = runlog.mean_std([e["figures"]["val_bpb"] for e in runs["baseline"]])
    mean, std = runlog.mean_std([e["figures"]["val_bpb"] for e in runs["no_smear"]])
    # paired by seed
    delta, delta_std = runlog.mean_std(
        [
            a["figures"]["val_bpb"] - b["figures"]["val_bpb"]
            for a, b in zip(runs["no_smear"], runs["baseline"], strict=True)
        ]
    )
    step_ratio = sum(e["figures"]["step_avg_ms"] for e in runs["no_smear"]) / sum(
        e["figures"]["step_avg_ms"] for e in runs["baseline"]
    )
    cpu_ratio = sum(e["cpu_s"] for e in runs["no_smear"]) / sum(
        e["cpu_s"] for e in runs["baseline"]
    )

    columns = (
        "seeds",
        "val_bpb (mean ± std)",
        "Δ vs baseline (paired)",
        "step time / baseline",
        "CPU time / baseline",
    )
    assert [table["baseline"][c] for c in columns] == [
        "2",
        f"{base_mean:.4f} ± {base_std:.4f}",
        "—",
        "1.00",
        "1.00",
    ]
    assert [table["no_smear"][c] for c in columns] == [
        "2",
        f"{mean:.4f} ± {std:.4f}",
        f"{delta:+.4f} ± {delta_std / 2**0.5:.4f}",
        f"{step_ratio:.2f}",
        f"{cpu_ratio:.2f}",
    ]
    assert table["bad"]["seeds"] == "0" and table["bad"]["notes"].startswith("failed: ")
    assert "NUM_HEADS=3" in table["bad"]["notes"]
    header = (tmp_path / "LADDER.md").read_text()
    assert (
        "What it can show" in header
        and "What it cannot show" in header
        and "Fixed configuration" in header
    )

    # A changed row is stale: shown as such, kept while other rows run, and run again when selected.
    rows.write_text("baseline:\nno_smear: SMEAR_GATE=0 QAT=0\nbad: NUM_HEADS=3\nnew: QAT=0\n")
    kept = bench("ladder.py", *args, "--rows", "baseline")
    assert kept.stdout.count("stored result is current (ok), kept") == 2
    table = ladder_table(tmp_path / "LADDER.md")
    assert table["no_smear"]["seeds"] == "0" and "2 stale run(s)" in table["no_smear"]["notes"]
    assert table["new"]["notes"] == "not run yet"
    bench("ladder.py", *args, "--rows", "no_smear", "--seeds", "1")
    stored = json.loads((tmp_path / "ladder.json").read_text())["runs"]
    assert stored["no_smear"]["1"]["row_env"] == {"SMEAR_GATE": "0", "QAT": "0"}
    assert stored["no_smear"]["2"]["row_env"] == {"SMEAR_GATE": "0"}
    table = ladder_table(tmp_path / "LADDER.md")
    assert table["no_smear"]["seeds"] == "1" and "1 stale run(s)" in table["no_smear"]["notes"]
    listing = bench("ladder.py", *args, "--list").stdout
    assert "no_smear: SMEAR_GATE=0 QAT=0  [seed 1: ok, seed 2: stale]" in listing


def test_ladder_reexport_rows_reuse_the_base_weights_two_runs_at_a_time(tiny_data, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text(
        "baseline:\nloops: NUM_LOOPS=1 LOOP_START=0 LOOP_END=0 ENABLE_LOOPING_AT=0.5\n"
        "int5: @baseline MLP_BITS=5\norphan: @loops COMPRESSOR=lzma\n"
    )
    bench(
        "ladder.py",
        *ladder_args(tiny_data, tmp_path, rows),
        "--jobs",
        "2",
        "--rows",
        "baseline,loops,int5",
    )
    stored = json.loads((tmp_path / "ladder.json").read_text())["runs"]
    for seed in ("1", "2"):
        base, int5 = stored["baseline"][seed], stored["int5"][seed]
        assert int5["status"] == "ok" and int5["row_env"] == {"@": "baseline", "MLP_BITS": "5"}
        # nothing trained: the baseline's weights, exported again
        assert int5["figures"]["steps"] == 0
        assert int5["figures"]["prequant_val_bpb"] == pytest.approx(
            base["figures"]["prequant_val_bpb"], abs=1e-6
        )
        assert int5["figures"]["bytes_total"] < base["figures"]["bytes_total"]
        assert stored["loops"][seed]["figures"]["loop_step_ratio"] > 0
    table = ladder_table(tmp_path / "LADDER.md")
    assert (
        table["int5"]["settings"] == "`@baseline MLP_BITS=5`"
        and "once the loops run" in table["loops"]["notes"]
    )
    # it trained nothing
    assert table["int5"]["data epochs"] == "—" != table["baseline"]["data epochs"]
    bench("ladder.py", *ladder_args(tiny_data, tmp_path, rows), "--rows", "orphan", "--seeds", "3")
    (orphan,) = json.loads((tmp_path / "ladder.json").read_text())["runs"]["orphan"].values()
    assert orphan["status"] == "failed" and "run --rows loops first" in orphan["error"]


def test_loop_step_ratio_is_the_step_time_after_the_switch_over_before():
    log = runlog.parse_log(
        "looping_on step:3 train_time:300ms virtual_layers:[0, 0, 1] graphs:0\n"
        "training_done steps:6 train_time:900ms graphs:0 wall_time:950ms data_epochs:0.1\n"
    )
    assert log.looping_on == (3, 300.0) and ladder.loop_step_ratio(log) == pytest.approx(
        (600 / 3) / (300 / 3)
    )
    assert (
        ladder.loop_step_ratio(runlog.parse_log("training_done steps:6 train_time:900ms\n")) is None
    )


def test_ladder_rows_file_errors_name_the_line(tmp_path):
    cases = {
        "qat_off: QAT=0\n": "first row must be `baseline:`",
        "baseline:\nx: QAT=0\nx: QAT=1\n": "rows.txt:3: row 'x' is defined twice",
        "baseline:\nx: SEED=3\n": "rows.txt:2: SEED is set by the ladder itself",
        "baseline:\nx: qat=0\n": "rows.txt:2: 'qat=0' is not KEY=VALUE",
        "baseline:\nx: @later QAT=0\nlater: QAT=1\n": "rows.txt:2: @later must name an earlier row",
    }
    for text, message in cases.items():
        path = tmp_path / "rows.txt"
        path.write_text(text)
        with pytest.raises(SystemExit, match=re.escape(message)):
            ladder.read_rows(path)


def test_the_real_rows_file_parses_with_baseline_first():
    rows = ladder.read_rows(ROOT / "bench" / "ladder_rows.txt")
    assert next(iter(rows)) == "baseline" and rows["baseline"] == {} and len(rows) >= 2


# -----------------------------------------------------------------------------
# The log reader
# -----------------------------------------------------------------------------

BASELINE_SCRIPT_OUTPUT = """logs/peer.txt
model_params:17059912
world_size:1 grad_accum_steps:8
warmup_step:20/20
step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.01ms
step:1/20000 train_loss:6.9370 train_time:402ms step_avg:402.00ms
step:10/20000 train_loss:6.1000 train_time:4000ms step_avg:400.00ms
step:200/20000 train_loss:2.9000 train_time:72000ms step_avg:360.00ms
step:400/20000 train_loss:2.7000 train_time:142000ms step_avg:355.00ms
step:412/20000 train_loss:2.6500 train_time:146000ms step_avg:354.37ms
step:412/20000 val_loss:2.6000 val_bpb:1.5400 train_time:146000ms step_avg:354.37ms
stopping_early: wallclock_cap train_time:146000ms step:412/20000
peak memory allocated: 10184 MiB reserved: 10588 MiB
Serialized model: 67224983 bytes
Code size: 47686 bytes
Total submission size: 67272669 bytes
Serialized model int8+zlib: 15815847 bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)
Total submission size int8+zlib: 15863533 bytes
final_int8_zlib_roundtrip val_loss:2.6100 val_bpb:1.5458 eval_time:1500ms
final_int8_zlib_roundtrip_exact val_loss:2.61000000 val_bpb:1.54580000
"""


def test_the_log_reader_reads_the_challenge_baseline_format():
    log = runlog.parse_log(BASELINE_SCRIPT_OUTPUT)
    assert log.step_times == [
        (1, 402.0),
        (10, 4000.0),
        (200, 72000.0),
        (400, 142000.0),
        (412, 146000.0),
    ]
    assert runlog.steady_step_ms(log.step_times) == (142000.0 / 402, 402)
    assert (
        log.prequant_val_bpb == 1.54
        and log.roundtrip_val_bpb == 1.5458
        and log.final_val_bpb == 1.5458
    )
    assert log.quant_penalty_bpb == pytest.approx(0.0058)
    assert log.roundtrip_eval_ms == 1500.0 and log.sliding_val_bpb is None and log.export_ms is None
    assert (log.bytes_total, log.artifact_format) == (15_863_533, "int8+zlib")
    assert (log.peak_allocated_mib, log.peak_reserved_mib) == (10184.0, 10588.0)
    # steps: its last logged step
    assert log.steps == 412 and not log.completed and log.error is None


def test_steady_step_time_excludes_the_first_steps():
    times = [(1, 900.0), (2, 1000.0), (3, 1100.0), (10, 1800.0), (20, 2800.0), (30, 3800.0)]
    assert runlog.steady_step_ms(times) == (100.0, 20)
    assert runlog.steady_step_ms(times, from_step=2) == (2800.0 / 28, 28)
    # nothing that late: from the first
    assert runlog.steady_step_ms(times[:3], from_step=10) == (100.0, 2)
    assert runlog.steady_step_ms(times[:1]) is None


OUR_CUDA_OUTPUT = """run_id:x world_size:1 grad_accum_steps:8 device:cuda:0 compile:1 \
attention:flash host_sync:gloo \
python:3.11.7 torch:2.11.0 cuda:12.8 gpu:NVIDIA H100 80GB HBM3
model_params:21779016 layers:9 dim:512 heads:8/4 mlp_mult:3 flops_per_token:131072000 \
peak_flops_per_device:9.89e+14
warmup_steps:20 warmup_time:95000ms (undone)
step:1/70 train_loss:6.9300 train_time:420ms step_avg:420.00ms tok_s:1248305 mfu:16.5%
step:10/70 train_loss:6.1000 train_time:3600ms step_avg:360.00ms tok_s:1456355 mfu:19.3%
step:70/70 train_loss:4.2000 train_time:24600ms step_avg:351.43ms tok_s:1491899 mfu:19.8%
training_done steps:70 train_time:24600ms wall_time:25000ms raw_checkpoint:artifacts/x_raw.pt \
data_epochs:12.032
peak memory allocated:30000MiB reserved:32000MiB
artifact:artifacts/x.int6.ptz export_time:21000ms
Total submission size int6+zstd-22: 15500000 bytes
final_prequant_exact val_loss:2.00000000 val_bpb:1.20000000
final_int6_roundtrip_exact val_loss:2.01 val_bpb:1.21000000 quant_penalty_bpb:+0.01000 \
eval_time:9000ms graphs:2 compile_time:30000ms
final_sliding_window_exact stride:64 seq_len:1024 val_loss:1.99 val_bpb:1.19000000 \
scored_tokens:203393 eval_time:12000ms graphs:2 compile_time:31000ms
sliding_rate scored_tok_s:16949 per_rank:16949 projected_fineweb_8gpu:470.4s
run_complete run_id:x val_loss:1.99000000 val_bpb:1.19000000
"""


def test_the_log_reader_and_the_figures_on_our_cuda_lines():
    log = runlog.parse_log(OUR_CUDA_OUTPUT)
    assert log.header["attention"] == "flash" and log.header["device"] == "cuda:0" and log.completed
    assert (log.warmup_ms, log.steps, log.data_epochs, log.export_ms) == (
        95000.0,
        70,
        12.032,
        21000.0,
    )
    assert (
        log.roundtrip_graphs,
        log.roundtrip_compile_ms,
        log.sliding_graphs,
        log.scored_tokens,
    ) == (2, 30000.0, 2, 203393)
    assert (log.sliding_tok_s, log.projected_fineweb_8gpu_s, log.final_val_bpb) == (
        16949.0,
        470.4,
        1.19,
    )
    args = argparse.Namespace(nproc=1, settle_steps=10)
    f = gpu_bench.figures(log, {"TRAIN_BATCH_TOKENS": "524288"}, args, {"train_tokens": 3_050_390})
    assert (f["ms_per_step"], f["timed_steps"]) == (350.0, 60)  # (24600 - 3600) / (70 - 10)
    assert f["tokens_per_s"] == pytest.approx(524288 / 0.350)
    assert f["mfu"] == pytest.approx(131072000 * 524288 / 0.350 / 9.89e14)
    assert (f["peak_allocated_mib"], f["peak_reserved_mib"], f["quant_penalty_bpb"]) == (
        30000.0,
        32000.0,
        0.01,
    )
    assert gpu_bench.projection_cell(f, {"gpu_count": 1}) == "470.4 s"
    assert gpu_bench.runtime_cell(f) == "flash, compiled"


def test_doc_attention_measures_each_throughput_configuration_off_and_on():
    args = gpu_bench.parse_args(
        ["--only", "throughput", "--presets", "frontier", "--doc-attention"]
    )
    configs = gpu_bench.Bench(args, {}, {}, "x").throughput_configs()
    assert configs == [
        ("default DOC_ATTENTION=0", {"DOC_ATTENTION": "0"}),
        ("default DOC_ATTENTION=1", {"DOC_ATTENTION": "1"}),
        ("PRESET=frontier DOC_ATTENTION=0", {"PRESET": "frontier", "DOC_ATTENTION": "0"}),
        ("PRESET=frontier DOC_ATTENTION=1", {"PRESET": "frontier", "DOC_ATTENTION": "1"}),
    ]
    args = gpu_bench.parse_args(["--only", "throughput", "--presets", "frontier"])
    assert len(gpu_bench.Bench(args, {}, {}, "x").throughput_configs()) == 2
