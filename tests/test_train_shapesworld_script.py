"""scripts/train_shapesworld.py: the class sets of its validation proxies, and that they never overwrite the
shipped weights (checked before anything is rendered or trained)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_shapesworld as T  # noqa: E402
from whymatch.data.shapesworld import FIT_CLASSES, TEST_CLASSES, TRAIN_CLASSES, VALIDATION_CLASSES  # noqa: E402


def test_proxy_class_sets_leave_their_validation_classes_unseen():
    h0, h1 = set(T.CLASS_SETS["half0"]), set(T.CLASS_SETS["half1"])
    assert h0.isdisjoint(h1) and h0 | h1 == set(TRAIN_CLASSES) and abs(len(h0) - len(h1)) <= 1
    assert set(T.CLASS_SETS["fit"]) == set(FIT_CLASSES) and set(FIT_CLASSES).isdisjoint(VALIDATION_CLASSES)
    for name, classes in T.CLASS_SETS.items():
        assert set(classes).isdisjoint(TEST_CLASSES), name


@pytest.mark.parametrize("choice", ["fit", "half0", "half1"])
def test_a_proxy_refuses_the_shipped_weights_path(choice, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--classes", choice])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--classes {choice}" in err and "shipped weights" in err and "--weights" in err


def test_an_unknown_class_set_is_refused(capsys):
    with pytest.raises(SystemExit):
        T.main(["--classes", "half2"])
    assert "--classes" in capsys.readouterr().err
