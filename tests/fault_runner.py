"""Runs train_gpt.py's command with one fault injected, for the tests of how failures are handled.

FAULT=raise_on_rank:R:N   rank R raises in its N-th training step (count the warm-up steps too)
FAULT=freeze_on_rank:R:N  rank R stops answering (sleeps) in its N-th training step
FAULT=gloo_group_fails    creating a gloo group beside the world group fails (host-sync fallback)
FAULT=before_training     building the optimizers fails: after the log exists, before the first step
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def inject(fault: str) -> None:
    kind, *args = fault.split(":")
    if kind in ("raise_on_rank", "freeze_on_rank"):
        rank, bad_call = map(int, args)
        real_step, calls = tg.train_step, [0]

        def train_step(*args, **kwargs):
            calls[0] += 1
            if int(os.environ.get("RANK", "0")) == rank and calls[0] == bad_call:
                if kind == "freeze_on_rank":  # deaf to its peers, not to the launcher's SIGTERM
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    time.sleep(3600)
                raise RuntimeError(f"injected fault on rank {rank}")
            return real_step(*args, **kwargs)

        tg.train_step = train_step
    elif kind == "gloo_group_fails":

        def new_group(*args, **kwargs):
            raise RuntimeError("injected gloo failure")

        tg.dist.new_group = new_group
    elif kind == "before_training":

        def build_optimizers(*args, **kwargs):
            raise RuntimeError("injected failure before training")

        tg.build_optimizers = build_optimizers
    else:
        raise SystemExit(f"unknown FAULT={fault}")


if __name__ == "__main__":
    inject(os.environ["FAULT"])
    sys.exit(tg.cli())
