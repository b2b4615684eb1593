"""POST /jobs/estimate for the default model, the multimodal Gemma-3-12B-it: its vision tower counts."""

from __future__ import annotations

import pytest

from trinity_core import model_config
from trinity_core.train import memory

from .conftest import new_tenant


def test_default_model_estimate_has_a_vision_part(client, session):
    _, headers = new_tenant(session)
    r = client.post("/jobs/estimate", json={}, headers=headers)  # default model: shipped published config
    assert r.status_code == 200, r.text
    vision_gib = memory.vision_params(model_config.load("unsloth/gemma-3-12b-it-bnb-4bit")) * 2 / memory.GIB
    for rung in r.json()["rungs"]:
        assert rung["parts"]["vision"] == pytest.approx(vision_gib, abs=1e-3)
        assert rung["gib"] == pytest.approx(sum(rung["parts"].values()), abs=1e-2)
