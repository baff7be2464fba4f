"""The README stays true: every setting is documented with its real default, and its commands exist."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conftest import ROOT

import train_gpt as tg


def readme_settings_table() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([A-Z0-9_]+)` \| (.*?) \| .* \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_setting_is_in_the_readme_with_its_default():
    rows = readme_settings_table()
    assert set(rows) == set(tg.Hyperparameters.env_names())
    for f in dataclasses.fields(tg.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default
        shown = rows[f.name.upper()]
        assert shown == ("(empty)" if default == "" else f"`{default}`"), f.name.upper()


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for script in re.findall(r"(?:bash|python3?) ((?:scripts|data|records|bench)/[\w/.]+)", text):
        assert (ROOT / script).is_file(), script
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_requested_without_cuda_is_a_clear_error():
    h = tg.Hyperparameters.from_env({"DEVICE": "cuda"})
    with pytest.raises(ValueError, match="DEVICE=cuda"):
        tg.init_runtime(h, {})
