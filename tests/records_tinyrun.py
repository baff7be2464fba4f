"""Tiny real runs of train_gpt.py on CPU, for the tests of records/ (on conftest's tiny dataset)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_trainers(
    workdir: Path, runs: dict[str, dict[str, str]], code: Path, timeout_s: float = 300
) -> None:
    """`python3 train_gpt.py` in `workdir` once per RUN_ID in `runs` (with its settings),
    all at once; raises if any fails."""
    procs = {}
    for run_id, settings in runs.items():
        # A clean environment: no stray setting of the caller's leaks into the run.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "OMP_NUM_THREADS": "1",
            **settings,
            "RUN_ID": run_id,
        }
        procs[run_id] = subprocess.Popen(
            [sys.executable, str(code)],
            cwd=workdir,
            env=env,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    failures = []
    for run_id, proc in procs.items():
        _, stderr = proc.communicate(timeout=timeout_s)
        if proc.returncode != 0:
            failures.append(f"{run_id}: exit {proc.returncode}\n{stderr[-2000:]}")
    if failures:
        raise RuntimeError("train_gpt.py failed:\n" + "\n".join(failures))
