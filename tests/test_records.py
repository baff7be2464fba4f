"""Tests of records/: submission folders, refusals, the significance test, sweeps, plots and
packed code.

Built on real tiny CPU runs of train_gpt.py made once per session: three seeds of a 20-step
run and two seeds of a 5-step run, all in one logs folder, and two of those seeds run again
from the packed file. Broken runs are edited copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import IMPORT_PROBE, run_script, tiny_env
from records_tinyrun import REPO, run_trainers

sys.path.insert(0, str(REPO / "records"))
import make_submission  # noqa: E402
import record_tools as rt  # noqa: E402

SEEDS = (1, 2, 3)
SUBMIT_ARGS = [
    "--name",
    "Tiny Test: 2x64",
    "--author",
    "Test Author",
    "--github-id",
    "tester",
    "--blurb",
    "A two-layer model trained for 20 steps.",
    "--date",
    "2026-01-02",
]


@dataclasses.dataclass(frozen=True)
class TinyRuns:
    root: Path
    logs: Path
    code: Path  # the train_gpt.py that ran (a copy, so edits to the repository's cannot race)

    def run(self, run_id: str) -> Path:
        return self.logs / f"{run_id}.txt"

    @property
    def seeds(self) -> list[Path]:
        return [self.run(f"seed{s}") for s in SEEDS]


def tiny_settings(tiny_data: dict, root: Path) -> dict[str, str]:
    """conftest's tiny model with two heads, trained for 20 steps with validation and a sliding
    evaluation: a few seconds on one CPU core. Its logs go to root/logs."""
    return tiny_env(
        tiny_data,
        root,
        NUM_HEADS=2,
        NUM_KV_HEADS=1,
        VAL_BATCH_SIZE=4096,
        ITERATIONS=20,
        VAL_LOSS_EVERY=10,
        TRAIN_LOG_EVERY=10,
        WARMDOWN_ITERS=5,
        EVAL_STRIDE=32,
        COMPILE=0,
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_data) -> TinyRuns:
    root = tmp_path_factory.mktemp("tiny_runs")
    code = root / "train_gpt.py"
    shutil.copyfile(REPO / "train_gpt.py", code)
    settings = tiny_settings(tiny_data, root)
    runs = {f"seed{s}": {**settings, "SEED": str(s)} for s in SEEDS}
    runs |= {f"short{s}": {**settings, "SEED": str(s), "ITERATIONS": "5"} for s in (1, 2)}
    run_trainers(root, runs, code)
    return TinyRuns(root=root, logs=root / "logs", code=code)


def forge_run(
    real: Path,
    dest: Path,
    *,
    source: bytes | None = None,
    bytes_model: int | None = None,
    cut_at: str | None = None,
    remove: str | None = None,
    write_summary: bool = True,
    summary_edits: dict | None = None,
) -> Path:
    """A copy of a real run under `dest`, edited so that its log and summary still agree
    (apart from `summary_edits`); returns the copy's log path. `cut_at` ends the log before
    the first line starting with it; `remove` drops the lines starting with it."""
    run = rt.load_run(real)
    source = run.source if source is None else source
    summary = dict(run.summary)
    summary["bytes_model"] = summary["bytes_model"] if bytes_model is None else bytes_model
    summary["bytes_code"] = len(source)
    summary["bytes_total"] = summary["bytes_model"] + summary["bytes_code"]
    summary["fits"] = summary["bytes_total"] <= rt.ARTIFACT_LIMIT_BYTES
    summary["code_sha256"] = hashlib.sha256(source).hexdigest()
    lines = []
    for line in rt.split_log(run.log_path)[1]:
        if line.startswith("Code size:"):
            line = f"Code size: {summary['bytes_code']} bytes"
        elif line.startswith("Total submission size"):
            line = f"{line.split(':')[0]}: {summary['bytes_total']} bytes"
        elif line.startswith("fits_16mb:"):
            line = (
                f"fits_16mb:{str(summary['fits']).lower()} "
                f"margin:{rt.ARTIFACT_LIMIT_BYTES - summary['bytes_total']}"
            )
        if cut_at is not None and line.startswith(cut_at):
            break
        if remove is None or not line.startswith(remove):
            lines.append(line)
    summary.update(summary_edits or {})
    dest.mkdir(parents=True, exist_ok=True)
    log_path = dest / run.log_path.name
    header = (
        f"code_begin path:train_gpt.py bytes:{len(source)} "
        f"sha256:{hashlib.sha256(source).hexdigest()}\n"
    )
    log_path.write_bytes(
        header.encode() + source + b"\ncode_end\n" + "".join(line + "\n" for line in lines).encode()
    )
    if write_summary:
        (dest / run.summary_path.name).write_text(json.dumps(summary, indent=2))
    return log_path


def submit(tiny: TinyRuns, runs: list[Path], track: Path, *extra: str) -> Path:
    """Run `make_submission.py submit` in-process; returns the folder it made."""
    argv = [
        "submit",
        *map(str, runs),
        *SUBMIT_ARGS,
        "--code",
        str(tiny.code),
        "--track-dir",
        str(track),
        *extra,
    ]
    assert make_submission.main(argv) == 0
    return track / "2026-01-02_Tiny_Test_2x64"


def refusal(runs: list[Path], code: Path, track: Path) -> str:
    with pytest.raises(rt.RecordError) as err:
        rt.make_submission(
            [rt.load_run(p) for p in runs],
            name="Refused",
            author="a",
            github_id="b",
            blurb="c",
            code_path=code,
            track_dir=track,
        )
    assert not track.exists() or not any(track.iterdir()), "a refused submission left files"
    return str(err.value)


# ---------------------------------------------------------------------------------------
# Reading real runs
# ---------------------------------------------------------------------------------------


def test_a_real_run_reads_back_with_the_source_that_ran(tiny):
    run = rt.load_run(tiny.run("seed1"))
    assert run.source == tiny.code.read_bytes()
    assert run.summary["seed"] == 1 and run.summary["steps"] == 20
    assert run.summary["sliding_val_bpb"] == run.summary["val_bpb"]  # EVAL_STRIDE=32 < 64
    # The same run, named by its summary or by the stem.
    assert rt.load_run(tiny.logs / "seed1.json").summary == run.summary
    assert rt.load_run(tiny.logs / "seed1").source == run.source


# ---------------------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------------------


def test_submit_writes_the_folder(tiny, tmp_path):
    folder = submit(tiny, tiny.seeds, tmp_path / "track")
    summaries = [json.loads((tiny.logs / f"seed{s}.json").read_text()) for s in SEEDS]

    assert (folder / "train_gpt.py").read_bytes() == tiny.code.read_bytes()
    for s in SEEDS:
        for suffix in (".txt", ".json"):
            name = f"seed{s}{suffix}"
            assert (folder / name).read_bytes() == (tiny.logs / name).read_bytes()

    meta = json.loads((folder / "submission.json").read_text())
    assert (meta["author"], meta["github_id"], meta["name"], meta["date"]) == (
        "Test Author",
        "tester",
        "Tiny Test: 2x64",
        "2026-01-02",
    )
    assert meta["blurb"] == "A two-layer model trained for 20 steps."
    assert meta["val_bpb"] == pytest.approx(
        statistics.fmean(s["val_bpb"] for s in summaries), abs=1e-8
    )
    assert meta["val_loss"] == pytest.approx(
        statistics.fmean(s["val_loss"] for s in summaries), abs=1e-8
    )
    assert meta["bytes_total"] == max(s["bytes_total"] for s in summaries)
    assert meta["bytes_code"] == len(tiny.code.read_bytes())
    assert [r["seed"] for r in meta["runs"]] == list(SEEDS)
    assert [r["val_bpb"] for r in meta["runs"]] == [s["val_bpb"] for s in summaries]

    readme = (folder / "README.md").read_text()
    for s, summary in zip(SEEDS, summaries, strict=True):
        assert (
            f"| {s} | `seed{s}` | {summary['val_loss']:.6f} | {summary['val_bpb']:.6f} |" in readme
        )
        assert f"SEED={s} RUN_ID=seed{s} " in readme
    assert "| `NUM_LAYERS` | `2` |" in readme and "| `MODEL_DIM` | `64` |" in readme
    assert "| `SEED`" not in readme and "| `RUN_ID`" not in readme  # per-run, not configuration
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "Significance" not in readme
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left


def test_submit_script_runs_standalone_with_a_reference(tiny, tmp_path):
    track = tmp_path / "track"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "records" / "make_submission.py"),
            "submit",
            *map(str, tiny.seeds),
            *SUBMIT_ARGS,
            "--code",
            str(tiny.code),
            "--track-dir",
            str(track),
            "--reference",
            str(tiny.run("short1")),
            str(tiny.run("short2")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "verdict: significant" in result.stdout
    folder = track / "2026-01-02_Tiny_Test_2x64"
    assert "## Significance" in (folder / "README.md").read_text()
    significance = json.loads((folder / "submission.json").read_text())["significance"]
    assert significance["significant"] is True and significance["ref_n"] == 2


def test_refuses_runs_made_with_different_code(tiny, tmp_path):
    edited = tiny.code.read_bytes() + b"# one more line\n"
    other = forge_run(tiny.run("seed2"), tmp_path / "other", source=edited)
    message = refusal([tiny.run("seed1"), other], tiny.code, tmp_path / "track")
    assert "runs made with different code" in message
    assert str(tiny.run("seed1")) in message and str(other) in message


def test_refuses_a_train_gpt_that_is_not_the_file_that_ran(tiny, tmp_path):
    edited = tmp_path / "train_gpt.py"
    edited.write_bytes(tiny.code.read_bytes().replace(b"\n", b"\r\n", 1))  # one byte more
    message = refusal(tiny.seeds, edited, tmp_path / "track")
    assert f"{edited} is not the file that ran" in message


def test_refuses_an_artifact_over_16mb(tiny, tmp_path):
    big = forge_run(tiny.run("seed2"), tmp_path / "big", bytes_model=15_990_000)
    message = refusal([tiny.run("seed1"), big], tiny.code, tmp_path / "track")
    over = 15_990_000 + len(tiny.code.read_bytes()) - 16_000_000
    assert str(big.with_suffix(".json")) in message
    assert "does not fit" in message and f"{over:,} bytes over" in message


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"cut_at": "run_complete"}, "did not finish: its last line is '"),
        ({"cut_at": "final_int6_roundtrip_exact"}, "its last line is 'final_prequant_exact"),
        ({"remove": "Total submission size"}, "did not finish: no 'Total submission size' line"),
        ({"remove": "final_int6_roundtrip_exact"}, "no 'final_int6_roundtrip_exact' line"),
    ],
)
def test_refuses_a_run_without_its_final_lines(tiny, tmp_path, edit, expected):
    cut = forge_run(tiny.run("seed3"), tmp_path / "cut", write_summary=False, **edit)
    with pytest.raises(rt.RecordError, match="did not finish") as err:
        rt.load_run(cut)
    assert str(cut) in str(err.value) and expected in str(err.value)


def test_refuses_a_run_without_its_summary(tiny, tmp_path):
    no_summary = forge_run(tiny.run("seed3"), tmp_path / "nosummary", write_summary=False)
    with pytest.raises(rt.RecordError, match="seed3.json: missing.*did not finish"):
        rt.load_run(no_summary)


def test_refuses_a_log_cut_inside_the_copied_source(tiny, tmp_path):
    cut = tmp_path / "seed1.txt"
    cut.write_bytes(tiny.run("seed1").read_bytes()[:5000])
    with pytest.raises(rt.RecordError, match="ends inside the copied source"):
        rt.load_run(cut)


def test_refuses_a_log_holding_two_runs(tiny, tmp_path):
    twice = tmp_path / "seed1.txt"
    twice.write_bytes(tiny.run("seed1").read_bytes() * 2)  # two logs joined into one
    shutil.copyfile(tiny.logs / "seed1.json", tmp_path / "seed1.json")
    with pytest.raises(rt.RecordError, match="more than one run.*logs joined by hand"):
        rt.load_run(twice)


def test_refuses_a_summary_that_disagrees_with_its_log(tiny, tmp_path):
    bad = forge_run(tiny.run("seed1"), tmp_path / "bad", summary_edits={"bytes_code": 100})
    with pytest.raises(rt.RecordError, match="disagree: bytes_code 100"):
        rt.load_run(bad)
    bad = forge_run(tiny.run("seed1"), tmp_path / "bad2", summary_edits={"val_bpb": 1.0})
    with pytest.raises(rt.RecordError, match="disagree: run_complete val_bpb"):
        rt.load_run(bad)


def test_refuses_a_folder_that_exists(tiny, tmp_path):
    track = tmp_path / "track"
    existing = track / "2026-01-02_Tiny_Test_2x64"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("untouched")
    argv = [
        "submit",
        *map(str, tiny.seeds),
        *SUBMIT_ARGS,
        "--code",
        str(tiny.code),
        "--track-dir",
        str(track),
    ]
    assert make_submission.main(argv) == 1
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(rt.RecordError, match="Tiny_Test_2x64: already exists"):
        rt.make_submission(
            [rt.load_run(p) for p in tiny.seeds],
            name="Tiny Test: 2x64",
            author="a",
            github_id="b",
            blurb="c",
            date="2026-01-02",
            code_path=tiny.code,
            track_dir=track,
        )


def test_refuses_repeated_seeds_and_mixed_configurations(tiny, tmp_path):
    message = refusal([tiny.run("seed1"), tiny.run("short1")], tiny.code, tmp_path / "track")
    assert "seed 1 is also the seed of" in message
    message = refusal([tiny.run("seed2"), tiny.run("short1")], tiny.code, tmp_path / "track")
    assert "runs differ in ITERATIONS" in message and "20" in message and "5" in message


# ---------------------------------------------------------------------------------------
# Significance
# ---------------------------------------------------------------------------------------

# Welch's t-test textbook example (Wikipedia, "Welch's t-test", example 1):
# t = -2.46, df = 24.99, two-sided p = 0.021 for A1 against A2.
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_matches_the_textbook_example():
    # A1 is lower (better): it improves on A2 by more than 0 with one-sided p = 0.021 / 2.
    t, df, p = rt.welch_improvement_test(A1, A2, min_improvement=0.0)
    assert t == pytest.approx(2.4554, abs=1e-4)
    assert df == pytest.approx(24.9885, abs=1e-4)
    assert p == pytest.approx(0.021378 / 2, abs=1e-6)


def test_welch_tests_the_improvement_against_the_margin():
    new, ref, margin = np.array(A1), np.array(A2), 0.5
    t, df, p = rt.welch_improvement_test(new, ref, min_improvement=margin)
    # By hand: improvement minus the margin over its standard error, Welch-Satterthwaite df.
    va, vb = ref.var(ddof=1) / len(ref), new.var(ddof=1) / len(new)
    t_hand = (ref.mean() - new.mean() - margin) / np.sqrt(va + vb)
    df_hand = (va + vb) ** 2 / (va**2 / (len(ref) - 1) + vb**2 / (len(new) - 1))
    assert t == pytest.approx(t_hand, rel=1e-12) and df == pytest.approx(df_hand, rel=1e-12)
    assert p == pytest.approx(stats.t.sf(t_hand, df_hand), rel=1e-9)
    # The same test on hand-shifted samples: new runs made worse by the margin, no margin.
    assert (t, df, p) == pytest.approx(rt.welch_improvement_test(new + margin, ref, 0.0))
    # A larger margin is harder to show.
    assert (
        rt.welch_improvement_test(new, ref, 1.5)[2]
        > p
        > rt.welch_improvement_test(new, ref, 0.0)[2]
    )
    # From mean, std and n: the same numbers.
    given = rt.SummaryStats(ref.mean(), ref.std(ddof=1), len(ref))
    assert rt.welch_improvement_test(new, given, margin) == pytest.approx((t, df, p), rel=1e-10)


def test_compare_reports_nats_bpb_and_verdict():
    ratio = 0.6  # bpb per nat, the same for every run on one validation set
    new = [rt.Score(f"n{i}", v, v * ratio) for i, v in enumerate([2.000, 2.002, 2.001])]
    ref = [rt.Score(f"r{i}", v, v * ratio) for i, v in enumerate([2.020, 2.021, 2.019])]
    c = rt.compare(new, ref)
    assert c.improvement_nats == pytest.approx(0.019)
    assert c.improvement_bpb == pytest.approx(0.019 * ratio)
    assert c.new.mean == pytest.approx(2.001) and c.ref.std == pytest.approx(0.001)
    assert c.significant and "verdict: significant: improves by at least 0.005 nats" in c.format()
    assert not rt.compare(new, ref, min_improvement=0.02).significant
    assert not rt.compare(ref, new).significant  # worse is never significant
    # In bpb: the same data, the margin in bpb.
    in_bpb = rt.compare(new, ref, metric="val_bpb", min_improvement=0.005)
    assert in_bpb.improvement_nats == pytest.approx(0.019)
    assert in_bpb.improvement == pytest.approx(0.019 * ratio)
    with pytest.raises(rt.RecordError, match="at least 2 new runs"):
        rt.compare(new[:1], ref)
    with pytest.raises(rt.RecordError, match="n >= 2"):
        rt.compare(new, rt.SummaryStats(2.02, 0.001, 1))


def test_compare_real_runs_against_shorter_runs(tiny, capsys):
    new = [str(tiny.logs / f"seed{s}.json") for s in SEEDS]
    assert (
        make_submission.main(
            ["compare", *new, "--reference", str(tiny.run("short1")), str(tiny.run("short2"))]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "new        n=3" in out and "reference  n=2" in out
    assert "verdict: significant" in out
    # Against a given mean and std: an improvement of 10 nats is not shown.
    short = [json.loads((tiny.logs / f"short{s}.json").read_text())["val_loss"] for s in (1, 2)]
    assert (
        make_submission.main(
            [
                "compare",
                *new,
                "--ref-mean",
                str(statistics.fmean(short)),
                "--ref-std",
                str(statistics.stdev(short)),
                "--ref-n",
                "2",
                "--min-improvement",
                "10",
            ]
        )
        == 0
    )
    assert "verdict: not significant" in capsys.readouterr().out


def test_reference_scores_from_folders_and_other_logs(tiny, tmp_path):
    folder = submit(tiny, tiny.seeds, tmp_path / "track")
    scores, _ = rt.load_scores([folder])
    assert [s.label for s in scores] == ["seed1", "seed2", "seed3"]
    # A log from another trainer: its last final_*_exact line is the score.
    other = tmp_path / "other" / "train_seed42.log"
    other.parent.mkdir()
    other.write_text(
        "step:100/100 val_loss:2.1 val_bpb:1.25\n"
        "final_int8_zlib_roundtrip_exact val_loss:2.06035852 val_bpb:1.21687994\n"
    )
    hidden = other.parent / ".ipynb_checkpoints" / "train_seed42-checkpoint.log"
    hidden.parent.mkdir()
    shutil.copyfile(other, hidden)  # an editor's copy is not a second run
    scores, _ = rt.load_scores([other.parent])
    assert scores == [rt.Score("train_seed42", 2.06035852, 1.21687994)]
    # A submission.json with the mean only cannot be a sample.
    (other.parent / "submission.json").write_text(json.dumps({"val_loss": 2.06, "val_bpb": 1.22}))
    with pytest.raises(rt.RecordError, match="holds only the mean"):
        rt.load_scores([other.parent / "submission.json"])


def refused_comparison(new: list[Path], ref: list[Path], capsys) -> str:
    """`make_submission.py compare` of `new` against `ref`, which must fail with one error line;
    returns that line."""
    argv = ["compare", *map(str, new), "--reference", *map(str, ref)]
    assert make_submission.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err


def append_lines(log: Path, *lines: str) -> Path:
    with log.open("a") as f:
        f.write("".join(line + "\n" for line in lines))
    return log


@pytest.mark.parametrize(
    "how, expected",
    [
        (
            "killed during the sliding evaluation",
            "seed3.txt: the run did not finish: its last line is 'final_int6_roundtrip_exact ",
        ),
        ("stopped with an error line", "seed3.txt: the run failed (error: stopped by SIGTERM)"),
        ("summary missing", "seed3.json: missing; train_gpt.py writes the summary last"),
        ("summary with a nan score", "seed3.json: val_bpb is nan: the run failed"),
    ],
)
def test_compare_refuses_a_run_that_did_not_finish(tiny, tmp_path, capsys, how, expected):
    """A run killed or failed during its final evaluations has a round-trip score line; it is
    refused, named, like submit refuses it, instead of being scored by that line while its
    peers are scored by their sliding score."""
    dest = tmp_path / "broken"
    if how == "killed during the sliding evaluation":
        log = forge_run(tiny.run("seed3"), dest, cut_at="sliding_rate", write_summary=False)
    elif how == "stopped with an error line":
        log = forge_run(tiny.run("seed3"), dest, cut_at="sliding_rate", write_summary=False)
        append_lines(log, "error: stopped by SIGTERM")
    elif how == "summary missing":
        log = forge_run(tiny.run("seed3"), dest, write_summary=False)
    else:
        nan = {"val_bpb": float("nan"), "val_loss": float("nan")}
        log = forge_run(tiny.run("seed3"), dest, summary_edits=nan)
    assert any(line.startswith("final_int6_roundtrip_exact") for line in rt.split_log(log)[1])
    finished = [tiny.logs / "seed1.json", tiny.logs / "seed2.json"]
    for named in (log, log.with_suffix(""), log.with_suffix(".json")):
        with pytest.raises(rt.RecordError) as err:
            rt.load_scores([*finished, named])
        message = str(err.value)
        assert expected in message and str(dest) in message, message
        assert message.endswith("only finished runs are compared; leave it out")
    line = refused_comparison([*finished, log], [tiny.run("short1"), tiny.run("short2")], capsys)
    assert line.startswith("error: ") and expected in line
    # As a reference too, and the same run is refused by submit.
    line = refused_comparison(finished, [tiny.run("short1"), log], capsys)
    assert expected in line
    with pytest.raises(rt.RecordError, match="did not finish|failed|missing"):
        rt.load_run(log)


def test_a_folder_leaves_out_the_runs_that_did_not_finish(tiny, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    for s in (1, 2):
        for suffix in (".txt", ".json"):
            shutil.copyfile(tiny.logs / f"seed{s}{suffix}", folder / f"seed{s}{suffix}")
    killed = forge_run(tiny.run("seed3"), folder, cut_at="sliding_rate", write_summary=False)
    scores, notes = rt.load_scores([folder])
    assert [s.label for s in scores] == ["seed1", "seed2"]
    assert notes == [f"{killed}: skipped, the run did not finish (no summary)"]
    # Logs of train_gpt.py without their summaries: none finished, none is scored.
    only_logs = tmp_path / "only_logs"
    for s in (1, 2):
        forge_run(tiny.run(f"seed{s}"), only_logs, cut_at="sliding_rate", write_summary=False)
    scores, notes = rt.load_scores([only_logs])
    assert scores == [] and len(notes) == 2
    with pytest.raises(rt.RecordError, match=r"at least 2 new runs, got 0 \(2 left out: .*seed1"):
        rt.compare(scores, [rt.Score("r1", 2.0, 1.0), rt.Score("r2", 2.1, 1.1)], notes=notes)


def forge_roundtrip_final(real: Path, dest: Path) -> Path:
    """A copy of a real run as if its sliding evaluation had been off: the round trip's score is
    its final one, in the summary and in the run_complete line (as write_summary writes them)."""
    s = rt.load_run(real).summary
    roundtrip = {"val_loss": s["roundtrip_val_loss"], "val_bpb": s["roundtrip_val_bpb"]}
    log = forge_run(
        real,
        dest,
        remove="final_sliding_window_exact",
        summary_edits={**roundtrip, "sliding_val_loss": None, "sliding_val_bpb": None},
    )
    data = log.read_bytes()
    complete = (
        f"run_complete run_id:{s['run_id']} val_loss:{roundtrip['val_loss']:.8f} "
        f"val_bpb:{roundtrip['val_bpb']:.8f}\n"
    )
    log.write_bytes(data[: data.rindex(b"run_complete ")] + complete.encode())
    assert rt.load_run(log).summary["val_bpb"] == s["roundtrip_val_bpb"]
    return log


def test_compare_refuses_runs_scored_by_different_evaluations(tiny, tmp_path, capsys):
    plain = [forge_roundtrip_final(tiny.run(f"seed{s}"), tmp_path / "plain") for s in (2, 3)]
    sliding = [tiny.logs / "seed1.json", tiny.logs / "seed2.json"]
    shorts = [tiny.run("short1"), tiny.run("short2")]
    line = refused_comparison([*sliding, plain[1]], shorts, capsys)
    assert "the new runs are not scored by one evaluation (" in line
    assert f"final_sliding_window_exact: {sliding[0]}, {sliding[1]}" in line
    assert f"final_int6_roundtrip_exact: {plain[1].with_suffix('.json')})" in line
    line = refused_comparison(sliding, [shorts[0], plain[1]], capsys)
    assert "the reference runs are not scored by one evaluation" in line
    # Logs of another trainer: the last final_*_exact line of each.
    other = tmp_path / "other"
    other.mkdir()
    roundtrip = "final_int8_zlib_roundtrip_exact val_loss:2.06 val_bpb:1.22"
    (other / "seed1.log").write_text(
        f"{roundtrip}\nfinal_sliding_window_exact val_loss:2.01 val_bpb:1.19\n"
    )
    (other / "seed2.log").write_text(f"{roundtrip}\n")  # its sliding evaluation never ended
    scores, _ = rt.load_scores([other])
    assert [s.evaluation for s in scores] == [
        "final_sliding_window_exact",
        "final_int8_zlib_roundtrip_exact",
    ]
    with pytest.raises(rt.RecordError, match="reference runs are not scored by one evaluation"):
        rt.compare(rt.load_scores(sliding)[0], scores)
    # Each side scored by one evaluation, the sides by two: compared, and said.
    argv = ["compare", *map(str, plain), "--reference", *map(str, shorts)]
    assert make_submission.main(argv) == 0
    assert (
        "note: the new runs are scored by final_int6_roundtrip_exact, the reference by "
        "final_sliding_window_exact" in capsys.readouterr().out
    )


def forge_failed_before_training(real: Path, logs: Path, name: str) -> Path:
    """The log train_gpt.py sets aside when a run fails after its log exists and before its first
    step (run(): `{RUN_ID}.failed.txt`, then `.failed-1.txt`, ...): the start of a real log and
    the error line."""
    log = forge_run(real, logs / ".forge", cut_at="step:0/", write_summary=False)
    append_lines(log, "error: injected failure before training")
    return log.rename(logs / name)


def test_a_failed_runs_name_says_that_it_failed(tiny, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    forge_failed_before_training(tiny.run("seed1"), logs, "early.failed.txt")
    latest = forge_failed_before_training(tiny.run("seed1"), logs, "early.failed-1.txt")
    expected = (
        "the run failed before training (error: injected failure before training); its log is "
        f"{latest}, beside 1 earlier failed log(s); a failed run is never ranked, compared or "
        "submitted"
    )
    for named in (logs / "early", logs / "early.txt", logs / "early.json"):
        with pytest.raises(rt.RecordError) as err:
            rt.load_scores([named, tiny.run("seed2")])
        assert str(err.value).startswith(f"{named}: {expected}")
        with pytest.raises(rt.RecordError) as err:
            rt.load_run(named)
        assert str(err.value) == f"{named}: {expected}"
    line = refused_comparison([logs / "early", tiny.run("seed2")], [tiny.run("short1")], capsys)
    assert expected in line and "no such file" not in line
    for argv in (
        [
            "submit",
            str(logs / "early"),
            str(tiny.run("seed2")),
            *SUBMIT_ARGS,
            "--track-dir",
            str(tmp_path / "track"),
        ],
        ["sweep", str(logs / "early")],
        ["plot", str(logs / "early"), "-o", str(tmp_path / "plot.png")],
    ):
        assert make_submission.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, argv
    # The failed logs are listed by sweep as failed, never ranked.
    shutil.copyfile(tiny.logs / "seed2.txt", logs / "seed2.txt")
    shutil.copyfile(tiny.logs / "seed2.json", logs / "seed2.json")
    table = rt.sweep_table(logs)
    failed = table.split("failed (not ranked):")[1]
    assert f"{latest}: error: injected failure before training" in failed


# ---------------------------------------------------------------------------------------
# Sweeps and plots
# ---------------------------------------------------------------------------------------


def write_running_log(tiny: TinyRuns, path: Path) -> None:
    """A run still in progress: seed1's log up to its last training step, no summary."""
    log = tiny.run("seed1").read_bytes()
    path.write_bytes(log[: log.index(b"step:20/20 train_loss")])


def test_sweep_table_shows_what_differs_best_first(tiny, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tiny.logs, logs)
    write_running_log(tiny, logs / "running.txt")
    table = rt.sweep_table(logs)
    lines = table.splitlines()
    header = lines[0].split()
    assert header == [
        "run_id",
        "preset",
        "ITERATIONS",
        "SEED",
        "val_bpb",
        "bytes_total",
        "fits",
        "steps",
        "step_avg_ms",
    ]
    rows = [line.split() for line in lines[2:7]]
    summaries = {p.stem: json.loads(p.read_text()) for p in logs.glob("*.json")}
    assert [r[0] for r in rows] == sorted(summaries, key=lambda k: summaries[k]["val_bpb"])
    for row in rows:
        s = summaries[row[0]]
        assert row[1:] == [
            "-",
            str(s["hyperparameters"]["ITERATIONS"]),
            str(s["seed"]),
            f"{s['val_bpb']:.4f}",
            f"{s['bytes_total']:,}",
            "yes",
            str(s["steps"]),
            f"{s['step_avg_ms']:.2f}",
        ]
    assert f"not finished (no summary): {logs / 'running.txt'}" in table
    assert make_submission.main(["sweep", str(logs), "--markdown"]) == 0


def test_plot_writes_a_png(tiny, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tiny.logs, logs)
    write_running_log(tiny, logs / "running.txt")
    out = tmp_path / "plots" / "sweep.png"
    assert make_submission.main(["plot", str(logs), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["sweep.png"]
    curves = rt.load_curves([logs])
    assert {c.label.split()[0] for c in curves} == {
        "seed1",
        "seed2",
        "seed3",
        "short1",
        "short2",
        "running",
    }
    seed1 = next(c for c in curves if c.label.startswith("seed1 "))
    assert seed1.steps == [10, 20]  # step 0 left out


# ---------------------------------------------------------------------------------------
# Packed code
# ---------------------------------------------------------------------------------------

PACKED_SEEDS = (1, 2)


@pytest.fixture(scope="session")
def packed(tmp_path_factory, tiny, tiny_data) -> TinyRuns:
    """The tiny runs' train_gpt.py packed, and seeds 1 and 2 of the 20-step run made from it."""
    root = tmp_path_factory.mktemp("packed_runs")
    code = root / "train_gpt.py"
    assert make_submission.main(["pack", str(tiny.code), "-o", str(code)]) == 0
    runs = {f"seed{s}": {**tiny_settings(tiny_data, root), "SEED": str(s)} for s in PACKED_SEEDS}
    run_trainers(root, runs, code)
    return TinyRuns(root=root, logs=root / "logs", code=code)


def test_packing_round_trips_and_saves_bytes(tiny, packed, capsys):
    source, data = tiny.code.read_bytes(), packed.code.read_bytes()
    assert rt.unpack_code(data) == source
    assert rt.unpack_code(source) is None  # a plain source is not a packed one
    assert len(data) < 0.4 * len(source)
    data.decode("ascii")  # a text file: logs and reviews show it as it is
    # The command line: the same bytes again, and unpack prints the source.
    again = packed.root / "again.py"
    assert make_submission.main(["pack", str(tiny.code), "-o", str(again)]) == 0
    assert again.read_bytes() == data
    assert f"; {len(source) - len(data):,} bytes saved)" in capsys.readouterr().out
    assert (
        make_submission.main(["unpack", str(packed.code), "-o", str(packed.root / "source.py")])
        == 0
    )
    assert (packed.root / "source.py").read_bytes() == source
    assert (
        make_submission.main(["pack", str(packed.code), "-o", str(packed.root / "twice.py")]) == 1
    )
    assert "is already packed" in capsys.readouterr().err
    assert not (packed.root / "twice.py").exists()
    assert (
        make_submission.main(
            ["pack", str(packed.root / "source.py"), "-o", str(packed.root / "source.py")]
        )
        == 1
    )
    assert "is the source itself" in capsys.readouterr().err
    assert (packed.root / "source.py").read_bytes() == source


def test_runs_from_the_packed_file_score_as_the_plain_ones(tiny, packed):
    data = packed.code.read_bytes()
    for s in PACKED_SEEDS:
        plain, run = rt.load_run(tiny.run(f"seed{s}")), rt.load_run(packed.run(f"seed{s}"))
        for key in (
            "val_loss",
            "val_bpb",
            "prequant_val_loss",
            "roundtrip_val_bpb",
            "sliding_val_bpb",
            "bytes_model",
            "steps",
            "val_tokens",
            "scored_tokens",
        ):
            assert run.summary[key] == plain.summary[key], key
        assert [h["val_bpb"] for h in run.summary["val_history"]] == [
            h["val_bpb"] for h in plain.summary["val_history"]
        ]
        # The code that ran is the packed file: logged whole, counted at its size.
        assert run.source == data
        header = f"code_begin path:train_gpt.py bytes:{len(data)} sha256:{rt.sha256_hex(data)}\n"
        assert run.log_path.read_bytes().startswith(header.encode() + data)
        assert run.summary["bytes_code"] == len(data) == packed.code.stat().st_size
        assert run.summary["bytes_total"] == plain.summary["bytes_model"] + len(data)
        assert f"Code size: {len(data)} bytes" in rt.split_log(run.log_path)[1]


def test_submit_ships_the_packed_file(tiny, packed, tmp_path):
    folder = submit(packed, [packed.run(f"seed{s}") for s in PACKED_SEEDS], tmp_path / "track")
    assert (folder / "train_gpt.py").read_bytes() == packed.code.read_bytes()
    meta = json.loads((folder / "submission.json").read_text())
    assert meta["bytes_code"] == packed.code.stat().st_size
    assert meta["code_packed"] == {
        "bytes_source": len(tiny.code.read_bytes()),
        "source_sha256": rt.sha256_hex(tiny.code.read_bytes()),
    }
    readme = (folder / "README.md").read_text()
    assert "It is lzma-packed" in readme and "make_submission.py unpack train_gpt.py" in readme
    # The usual check: the file shipped is the file that ran, packed or plain.
    message = refusal([packed.run("seed1")], tiny.code, tmp_path / "other")
    assert f"{tiny.code} is not the file that ran" in message
    message = refusal([tiny.run("seed1")], packed.code, tmp_path / "other")
    assert f"{packed.code} is not the file that ran" in message


def test_edited_packed_files_are_refused(packed, tmp_path):
    data = packed.code.read_bytes()
    head, tail = rt.PACKED_HEAD, rt.PACKED_TAIL
    payload = data[len(head) : -len(tail)]
    cases = {
        "appended": (data + b"import os\n", "does not end with the packer's stub"),
        "tail edited": (data.replace(b'"exec"', b'"eval"'), "does not end with the packer's stub"),
        "outside base85": (
            head + payload[:100] + b'"+__import__("os").name+"' + payload[100:] + tail,
            "characters outside base85",
        ),
        "payload damaged": (
            head
            + payload[:200]
            + (b"A" if payload[200:201] != b"A" else b"B")
            + payload[201:]
            + tail,
            "the packed payload is damaged",
        ),
        "payload cut": (head + payload[:-50] + tail, "damaged|truncated"),
    }
    for label, (edited, message) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.py"
        path.write_bytes(edited)
        with pytest.raises(rt.RecordError, match=message) as err:
            rt.unpack_code(edited, str(path))
        assert str(path) in str(err.value), label
        assert make_submission.main(["unpack", str(path)]) == 1


def test_the_packed_file_executes_only_its_own_source(tiny, packed, tmp_path):
    """Imported in isolation (python -I, an empty working folder), the packed file compiles and
    executes exactly the source it embeds, opens no project file, touches no network, reads no
    setting and starts nothing, like the plain file."""
    alone, workdir = tmp_path / "alone", tmp_path / "cwd"
    alone.mkdir()
    workdir.mkdir()
    shutil.copyfile(packed.code, alone / "train_gpt.py")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MODEL_DIM": "abc",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "DEVICE": "cuda",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_PROBE, str(alone)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    source = tiny.code.read_text(encoding="utf-8")
    assert report["compile"] == [source]  # the embedded source, compiled once
    assert report["exec"].count("<unpacked train_gpt.py>") == 1
    assert report["reads"] == [] and not report["dist"] and not report["cuda"]
    assert report["socket"] == []
    in_project = [
        p for p in report["open"] if p.startswith(str(REPO)) and not p.startswith(sys.prefix)
    ]
    assert in_project == []
    assert str(alone / "train_gpt.py") in report["open"]
    # The module holds what the plain file defines (and the stub's four names).
    plain = [n for n in compile_names(source)]
    # the source may import lzma itself
    stub = {"base64", "linecache", "lzma", "s", "n"} - set(plain)
    assert sorted(set(report["names"]) - stub) == sorted(plain)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "cwd"] and not any(
        workdir.iterdir()
    )


def compile_names(source: str) -> list[str]:
    """Public module-level names of a source: its imports, functions, classes and assignments."""
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return sorted(n for n in names if not n.startswith("_"))


def test_two_processes_run_from_the_packed_file(packed, tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="packed_ddp", ITERATIONS="4")
    run_script(env, nproc=2, script=packed.code)
    run = rt.load_run(tmp_path / "logs" / "packed_ddp")
    assert run.summary["world_size"] == 2
    assert (
        run.source == packed.code.read_bytes()
        and run.summary["bytes_code"] == packed.code.stat().st_size
    )
