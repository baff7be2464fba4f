"""The technique switches: each against a slow, obviously-correct reference; off means the stored outputs."""

from __future__ import annotations

import json

import switches_off


def test_every_switch_off_reproduces_the_stored_outputs():
    assert switches_off.compute() == json.loads(switches_off.FIXTURE.read_text())
