"""From finished runs of train_gpt.py to a record submission, and the numbers around it.

    python records/make_submission.py submit logs/s1.txt logs/s2.txt logs/s3.txt \\
        --name "Int6 MLP3x" --author "Jane Doe" --github-id jdoe --blurb "What changed." \\
        [--reference records/track_10min_16mb/2026-03-17_Baseline]
    python records/make_submission.py compare logs/s1.json logs/s2.json logs/s3.json \\
        --reference records/track_10min_16mb/2026-03-17_Baseline
    python records/make_submission.py compare logs/sweep/ \\
        --ref-mean 2.0604 --ref-std 0.0012 --ref-n 3
    python records/make_submission.py sweep logs/
    python records/make_submission.py plot logs/ -o sweep.png
    python records/make_submission.py pack -o packed/train_gpt.py     # then run the seeds from it
    python records/make_submission.py unpack packed/train_gpt.py

A run is named by its log, its summary or their common stem (logs/s1.txt, logs/s1.json,
logs/s1). See records/README.md for the workflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record_tools as rt  # noqa: E402


def add_reference_args(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group(
        "reference",
        "a record folder, logs or summaries (--reference), "
        "or a mean, sample std and count (--ref-mean/--ref-std/--ref-n)",
    )
    group.add_argument(
        "--reference",
        nargs="+",
        metavar="PATH",
        help="record folder(s), logs folder(s), run summaries or train logs",
    )
    group.add_argument("--ref-mean", type=float)
    group.add_argument("--ref-std", type=float, help="sample standard deviation (ddof=1)")
    group.add_argument("--ref-n", type=int)
    parser.add_argument(
        "--metric",
        choices=sorted(rt.METRIC_UNITS),
        default="val_loss",
        help="val_loss in nats (the original rule, default) or val_bpb",
    )
    parser.add_argument(
        "--min-improvement",
        type=float,
        default=rt.DEFAULT_MIN_IMPROVEMENT,
        metavar="D",
        help="improvement to show, in the metric's unit (default %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=rt.DEFAULT_ALPHA,
        help="significance level (default %(default)s)",
    )
    parser.set_defaults(reference_required=required)


def reference_comparison(
    args: argparse.Namespace, new: list[rt.Score], notes: list[str]
) -> rt.Comparison | None:
    given_stats = [args.ref_mean, args.ref_std, args.ref_n]
    if args.reference and any(v is not None for v in given_stats):
        raise rt.RecordError("give either --reference or --ref-mean/--ref-std/--ref-n, not both")
    if args.reference:
        ref, ref_notes = rt.load_scores(args.reference)
        notes = notes + ref_notes
    elif all(v is not None for v in given_stats):
        ref = rt.SummaryStats(args.ref_mean, args.ref_std, args.ref_n)
    elif any(v is not None for v in given_stats):
        raise rt.RecordError("--ref-mean, --ref-std and --ref-n go together")
    elif args.reference_required:
        raise rt.RecordError("no reference: give --reference or --ref-mean/--ref-std/--ref-n")
    else:
        return None
    return rt.compare(
        new,
        ref,
        metric=args.metric,
        min_improvement=args.min_improvement,
        alpha=args.alpha,
        notes=notes,
    )


def cmd_submit(args: argparse.Namespace) -> None:
    runs = [rt.load_run(p) for p in args.runs]
    comparison = reference_comparison(args, [rt.run_score(r) for r in runs], [])
    folder = rt.make_submission(
        runs,
        name=args.name,
        author=args.author,
        github_id=args.github_id,
        blurb=args.blurb,
        date=args.date,
        code_path=args.code,
        track_dir=args.track_dir,
        folder=args.folder,
        comparison=comparison,
    )
    for warning in rt.track_warnings(runs):
        print(f"warning: {warning}", file=sys.stderr)
    if comparison is not None:
        print(comparison.format())
    print(f"wrote {folder}")


def cmd_compare(args: argparse.Namespace) -> None:
    new, notes = rt.load_scores(args.runs)
    print(reference_comparison(args, new, notes).format())


def cmd_sweep(args: argparse.Namespace) -> None:
    print(rt.sweep_table(args.logs, markdown=args.markdown))


def cmd_plot(args: argparse.Namespace) -> None:
    print(f"wrote {rt.plot_runs(args.runs, args.output)}")


def cmd_pack(args: argparse.Namespace) -> None:
    source = rt.read_file(args.source)
    if args.output.resolve() == args.source.resolve():
        raise rt.RecordError(
            f"-o {args.output} is the source itself; write the packed file elsewhere"
        )
    packed = rt.pack_code(source, str(args.source))
    rt.write_bytes_atomic(args.output, packed)
    print(
        f"wrote {args.output}: {len(packed):,} bytes ({args.source}: {len(source):,} bytes; "
        f"{len(source) - len(packed):,} bytes saved)"
    )


def cmd_unpack(args: argparse.Namespace) -> None:
    source = rt.unpack_code(rt.read_file(args.packed), str(args.packed))
    if source is None:
        raise rt.RecordError(
            f"{args.packed} is not a packed train_gpt.py (it does not start with the packer's stub)"
        )
    if args.output is None:
        sys.stdout.buffer.write(source)
    else:
        rt.write_bytes_atomic(args.output, source)
        print(f"wrote {args.output}: {len(source):,} bytes", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser(
        "submit", help="create records/track_10min_16mb/YYYY-MM-DD_Name/ from finished runs"
    )
    submit.add_argument("runs", nargs="+", help="the runs (logs/ID.txt, logs/ID.json or logs/ID)")
    submit.add_argument("--name", required=True, help="submission name; also names the folder")
    submit.add_argument("--author", required=True)
    submit.add_argument("--github-id", required=True)
    submit.add_argument("--blurb", required=True, help="one paragraph: what the submission does")
    submit.add_argument("--date", help="YYYY-MM-DD (default: today)")
    submit.add_argument("--folder", help="folder name after the date (default: from --name)")
    submit.add_argument(
        "--code",
        type=Path,
        default=rt.DEFAULT_CODE_PATH,
        help="the train_gpt.py to ship; must equal the source in the logs "
        "(default: the repository's)",
    )
    submit.add_argument(
        "--track-dir",
        type=Path,
        default=rt.TRACK_DIR,
        help="where submission folders go (default: records/track_10min_16mb)",
    )
    add_reference_args(submit, required=False)
    submit.set_defaults(handler=cmd_submit)

    comp = commands.add_parser(
        "compare", help="Welch's one-sided t-test: do the runs improve on a reference by >= D?"
    )
    comp.add_argument("runs", nargs="+", help="run summaries, train logs or folders of them")
    add_reference_args(comp, required=True)
    comp.set_defaults(handler=cmd_compare)

    sweep = commands.add_parser("sweep", help="table of every run under a folder, best first")
    sweep.add_argument("logs", type=Path, nargs="?", default=Path("logs"))
    sweep.add_argument("--markdown", action="store_true", help="print a Markdown table")
    sweep.set_defaults(handler=cmd_sweep)

    plot = commands.add_parser("plot", help="PNG of val_bpb against training time and step")
    plot.add_argument("runs", nargs="+", help="runs or folders of runs")
    plot.add_argument("-o", "--output", type=Path, default=Path("val_bpb.png"))
    plot.set_defaults(handler=cmd_plot)

    pack = commands.add_parser(
        "pack",
        help="write train_gpt.py as an lzma-compressed, self-extracting file that runs the same",
    )
    pack.add_argument(
        "source",
        type=Path,
        nargs="?",
        default=rt.DEFAULT_CODE_PATH,
        help="the source to pack (default: the repository's train_gpt.py)",
    )
    pack.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("packed") / "train_gpt.py",
        help="the packed file (default: packed/train_gpt.py)",
    )
    pack.set_defaults(handler=cmd_pack)

    unpack = commands.add_parser(
        "unpack", help="the source inside a packed train_gpt.py (nothing is run)"
    )
    unpack.add_argument("packed", type=Path)
    unpack.add_argument(
        "-o", "--output", type=Path, help="write the source here (default: standard output)"
    )
    unpack.set_defaults(handler=cmd_unpack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except rt.RecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
