"""The import structure of whymatch (tools/structure.py): no new import circle, no new arrow running back up
a floor of the data flow, and `import whymatch.data` / `whymatch.similarity` registers no op."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Arrows running back up that are known and accepted: (importing module, imported module) -> why.
ALLOWED_BACK_ARROWS: dict[tuple[str, str], str] = {}
# Import circles that are known and accepted (sorted members) -> why.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


@pytest.fixture(scope="module")
def structure():
    spec = importlib.util.spec_from_file_location("whymatch_structure", ROOT / "tools" / "structure.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def report(structure):
    return structure.analyse(with_duplicates=False)


def test_every_part_has_a_floor(report):
    assert report["unplaced"] == [], f"add these parts of whymatch to FLOORS in tools/structure.py: {report['unplaced']}"


def test_no_new_import_circle(report):
    new = {name: [c for c in comps if tuple(c) not in ALLOWED_CYCLES] for name, comps in report["cycles"].items()}
    assert not any(new.values()), f"new import circle(s): {new}"


def test_no_new_arrow_running_back_up(report):
    new = [f"{e['src']}:{e['line']} -> {e['dst']} ({e['src_floor']} -> {e['dst_floor']})"
           for e in report["back_arrows"] if (e["src"], e["dst"]) not in ALLOWED_BACK_ARROWS]
    assert not new, "imports from a lower floor to a higher one (see the floors in tools/structure.py):\n" + "\n".join(new)


def test_allow_lists_hold_only_what_remains(report):
    seen = {(e["src"], e["dst"]) for e in report["back_arrows"]}
    cycles = {tuple(c) for comps in report["cycles"].values() for c in comps}
    assert set(ALLOWED_BACK_ARROWS) <= seen, f"fixed, remove from ALLOWED_BACK_ARROWS: {set(ALLOWED_BACK_ARROWS) - seen}"
    assert set(ALLOWED_CYCLES) <= cycles, f"fixed, remove from ALLOWED_CYCLES: {set(ALLOWED_CYCLES) - cycles}"


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "whymatch"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


def test_the_tool_finds_a_circle_and_a_back_arrow(structure, tmp_path):
    pkg = _fake_package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "from ..ops import _validate as V\n",
        "ops/__init__.py": "",
        "ops/_validate.py": "",
        "train/__init__.py": "",
        "train/loop.py": "def f():\n    from ..cli import g\n",
        "cli.py": "from .train import loop\n",
        "similarity.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import x\n",
    })
    r = structure.analyse(pkg, with_duplicates=False)
    assert r["cycles"]["module/all"] == [["whymatch.cli", "whymatch.train.loop"]]
    assert r["cycles"]["module/module-level"] == []  # the import back is inside a function
    arrows = {(e["src"], e["dst"], e["kind"]) for e in r["back_arrows"]}
    assert arrows == {("whymatch.data", "whymatch.ops._validate", "module"),
                      ("whymatch.train.loop", "whymatch.cli", "function")}  # TYPE_CHECKING imports never run


def test_data_and_model_register_no_op():
    code = ("import sys, torch, whymatch.data, whymatch.similarity, whymatch.models; "
            "print(sorted(m for m in sys.modules if m.startswith('whymatch.ops')), hasattr(torch.ops.whymatch, 'rise_apply'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False", out
