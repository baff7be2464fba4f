"""The torch.compile path (what CUDA runs) on CPU: the whole script under fullgraph compilation,
with warm-up, training, plain and sliding evaluation, agrees with the uncompiled run."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_script, tiny_env


def test_compiled_run_matches_eager(tiny_data, tmp_path):
    results = {}
    for flag in ("0", "1"):
        env = tiny_env(
            tiny_data,
            tmp_path / f"compile{flag}",
            COMPILE=flag,
            RUN_ID=f"c{flag}",
            ITERATIONS=4,
            WARMUP_STEPS=2,
            GRAD_ACCUM_STEPS=1,
            EVAL_STRIDE=16,
            OMP_NUM_THREADS=2,
        )
        proc = run_script(env, timeout=600)
        log = (tmp_path / f"compile{flag}" / "logs" / f"c{flag}.txt").read_text()
        assert f"compile:{flag}" in log
        # padded: at most two shapes
        for name in ("final_int6_roundtrip_exact", "final_sliding_window_exact"):
            graphs = int(re.search(rf"^{name} .* graphs:(\d+) compile_time:\d+ms$", log, re.M)[1])
            assert graphs <= 2 if flag == "1" else graphs == 0, (name, graphs)
        results[flag] = json.loads(
            (tmp_path / f"compile{flag}" / "logs" / f"c{flag}.json").read_text()
        )
        assert "run_complete" in proc.stdout
    eager, compiled = results["0"], results["1"]
    assert compiled["steps"] == eager["steps"] == 4
    assert compiled["scored_tokens"] == eager["scored_tokens"] == tiny_data["val_tokens"] - 1
    for key in ("prequant_val_loss", "roundtrip_val_loss", "sliding_val_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=2e-3), key
    # QAT ran in the compiled forward on the export's grid: the quantization penalty stays small.
    assert abs(compiled["roundtrip_val_bpb"] - compiled["prequant_val_bpb"]) < 5e-3
