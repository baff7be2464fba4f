"""The README stays true: every setting documented with its real default, and its commands exist."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import train_gpt as tg
from conftest import ROOT


def describe_rule(kind: type, rule: str) -> str:
    """A setting's rule (train_gpt.rule_error reads it) as the README's settings table shows it."""
    if kind is bool:
        return "0, 1"
    if rule == "name":
        return "a file name"
    if "|" in rule:
        return ", ".join(choice or "(empty)" for choice in rule.split("|"))
    return rule or "any"


def readme_settings_table() -> dict[str, list[str]]:
    """The settings table's rows: variable -> [default, allowed, meaning]."""
    rows = {}
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([A-Z0-9_]+)` \| (.*?) \| (.*?) \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = [m.group(2), m.group(3), m.group(4)]
    return rows


def test_every_setting_is_in_the_readme_with_its_default_rule_and_meaning():
    rows = readme_settings_table()
    assert set(rows) == set(tg.Hyperparameters.env_names())
    for f in dataclasses.fields(tg.Hyperparameters):
        default = int(f.default) if isinstance(f.default, bool) else f.default
        shown = "(empty)" if default == "" else f"`{default}`"
        allowed = describe_rule(type(f.default), f.metadata["rule"])
        assert rows[f.name.upper()] == [shown, allowed, f.metadata["doc"]], f.name.upper()


def test_every_declared_rule_is_enforced_and_every_default_keeps_it():
    """Each rule is a string `validate` reads: the defaults pass it, and a value outside it is
    refused with an error naming the variable."""
    outside = {
        ">0": 0,
        ">=0": -1,
        "[0, 1)": 1.0,
        "[0, 1]": 1.5,
        "(0, 100]": 0.0,
        "5..8": 9,
        "1..22": 0,
        "1..65536": 65537,
        "0 or >=2": 1,
        "name": "a/b",
    }
    for f in dataclasses.fields(tg.Hyperparameters):
        rule, name = f.metadata["rule"], f.name.upper()
        assert tg.rule_error(name, f.default, rule) is None, name
        if not rule:
            continue
        bad = "no-such-choice" if "|" in rule else outside[rule]
        with pytest.raises(ValueError, match=re.escape(f"{name}=")):
            tg.Hyperparameters(**{f.name: bad}).validate()


def test_readme_commands_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for script in re.findall(r"(?:bash|python3?) ((?:scripts|data|records|bench)/[\w/.]+)", text):
        assert (ROOT / script).is_file(), script
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message shown when CUDA is missing"
)
def test_cuda_requested_without_cuda_is_a_clear_error():
    h = tg.Hyperparameters.from_env({"DEVICE": "cuda"})
    with pytest.raises(ValueError, match="DEVICE=cuda"):
        tg.init_runtime(h, {})
