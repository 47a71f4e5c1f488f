"""benchmarks/realphoto_table.py: runs on consecutive pair ranges (--offset) joined into one table (--concat)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realphoto_pairs as P  # noqa: E402
import realphoto_table as T  # noqa: E402


def test_a_longer_run_starts_with_the_pairs_of_a_shorter_one():
    # --offset K --pairs N runs on make_pairs(split, K + N)[K:]: pairs K.. must not depend on how many follow
    short, long = P.make_pairs("val", 2, 48, seed=3), P.make_pairs("val", 4, 48, seed=3)
    for a, b in zip(short, long):
        assert torch.equal(a.query, b.query) and torch.equal(a.query_mask, b.query_mask) and a.shared == b.shared
    assert not torch.equal(long[2].query, long[0].query)


def _part(path: Path, offset: int, values: dict, budget: dict | None = None, secs=None) -> str:
    n = len(values["pointing"])
    row = {f"per_pair_{k}": v for k, v in values.items()}
    row.update(constant_maps=1, budget=budget or {"n_masks": 1000}, threads=1)
    if secs is not None:
        row["per_pair_seconds"] = secs
    else:
        row["seconds_per_pair"] = 2.0
    data = {"split": "test", "size": 224, "seed": 0, "offset": offset, "pairs": n, "methods": {"rise": row},
            "command": f"run {offset}", "total_seconds": 10.0, "machine": {}, "load_at_end": None}
    path.with_suffix(".json").write_text(json.dumps(data))
    return str(path)


def test_concat_joins_the_per_pair_results_in_pair_order(tmp_path):
    v0 = {"pointing": [1, 0], "mass": [0.5, 0.1], "insertion": [70.0, 60.0], "deletion": [40.0, 50.0]}
    v1 = {"pointing": [1, 1, 1], "mass": [0.3, 0.2, 0.9], "insertion": [80.0, 75.0, 65.0],
          "deletion": [30.0, 45.0, 55.0]}
    a = _part(tmp_path / "a", 0, v0, secs=[1.0, 3.0])
    b = _part(tmp_path / "b", 2, v1)  # an older run without per-pair seconds: its mean counts for each pair
    out = T.concat_rows([b, a], "test", 224, 0, 0, 5)  # given out of order
    row = out["methods"]["rise"]
    for k in v0:
        joined = v0[k] + v1[k]
        assert row[f"per_pair_{k}"] == pytest.approx(joined)
        assert row[k] == pytest.approx(sum(joined) / 5)
        mean = sum(joined) / 5
        assert row[f"{k}_se"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in joined) / 4 / 5))
    assert row["seconds_per_pair"] == pytest.approx((1.0 + 3.0 + 3 * 2.0) / 5)
    assert row["constant_maps"] == 2 and out["commands"] == ["run 0", "run 2"]


def test_concat_refuses_gaps_overlaps_other_pairs_and_mixed_budgets(tmp_path):
    v = {"pointing": [1, 0], "mass": [0.5, 0.1], "insertion": [70.0, 60.0], "deletion": [40.0, 50.0]}
    a = _part(tmp_path / "a", 0, v)
    gap = _part(tmp_path / "gap", 3, v)
    with pytest.raises(SystemExit, match="starts at pair 3; expected 2"):
        T.concat_rows([a, gap], "test", 224, 0, 0, 4)
    b = _part(tmp_path / "b", 2, v)
    with pytest.raises(SystemExit, match="expected --pairs 4"):
        T.concat_rows([a, b], "test", 224, 0, 0, 6)
    with pytest.raises(SystemExit, match="other pairs"):
        T.concat_rows([a, b], "val", 224, 0, 0, 4)
    other = _part(tmp_path / "other", 2, v, budget={"n_masks": 200})
    with pytest.raises(SystemExit, match="different budgets"):
        T.concat_rows([a, other], "test", 224, 0, 0, 4)


def test_combine_adds_the_rows_commands_and_settings_of_a_run_made_side_by_side():
    first = {"methods": {"rise": 1, "lime": 2}, "command": "run a", "total_seconds": 10.0,
             "settings": {"rise_n_masks": 200, "causal_steps": 10}}
    second = {"methods": {"lime": 3, "mask": 4}, "command": "run c", "commands": ["run b", "run c"],
              "total_seconds": 30.0,
              "settings": {"rise_n_masks": 1000, "mask_n_iter": 40}}
    assert T.combine(None, second) is second
    out = T.combine(first, second)
    assert out["methods"] == {"rise": 1, "lime": 3, "mask": 4}  # the later run's row wins
    assert out["commands"] == ["run a", "run b", "run c"] and out["total_seconds"] == 30.0
    assert out["settings"] == {"rise_n_masks": 200, "causal_steps": 10, "mask_n_iter": 40}  # the first's win
    joined = {"methods": {"rise (larger budget)": 5}, "command": "", "commands": ["run d"],  # --concat's
              "total_seconds": 5.0}
    assert T.combine(out, joined)["settings"] == out["settings"]
