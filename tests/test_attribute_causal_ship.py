"""scripts/train_shapesworld_attributes.py: refuses results that cannot rebuild the shipped model, before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_shapesworld_attributes.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_shapesworld_attributes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_or_old_results_are_refused(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="--results"):
        script.main(["--results", str(tmp_path / "none.json"), "--out", str(tmp_path / "out")])
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"settings": {}, "methods": {}}))
    with pytest.raises(ValueError, match="chosen_settings"):
        script.main(["--results", str(part), "--out", str(tmp_path / "out")])
    old = tmp_path / "old.json"       # the format before 'sane_eq4' (the model shipped at 82cddd1)
    old.write_text(json.dumps({"settings": {}, "methods": {"sane": {}}, "chosen_settings": {}, "tuning": []}))
    with pytest.raises(ValueError, match="sane_eq4"):
        script.main(["--results", str(old), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_committed_results_can_rebuild_the_shipped_model(script):
    data = json.loads(script.DEFAULT_RESULTS.read_text())
    assert "sane_eq4" in data["methods"] and {"mu", "lam", "temperature"} <= set(data["chosen_settings"])
    assert data["phi_selected_on"] == "validation"
