"""Every `whymatch` failure is one line `whymatch <command>: error: ...` on stderr, exit status 2, no traceback,
found before any expensive work, and nothing is written to --out.

The table runs in-process (`cli.main`); a few cases run through `python -m whymatch.cli` to show that no
traceback reaches a terminal.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from whymatch import cli

# ------------------------------------------------------------------ the files the bad command lines point at
_USER_MODELS = '''
import torch
from torch import nn


def good():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


def raises():
    raise RuntimeError("factory exploded")


def returns_int():
    return 42


not_callable = 3


def exits():
    raise SystemExit(4)
'''


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


_AVSL_CONFIG = {"task": "avsl", "backbone": "shapes", "embedding_dim": 8, "topk": 4, "momentum": 0.5, "gamma": 10.0,
                "reliability": "map", "image_size": 32}


class _RunsCode:
    """Pickles to a call of os.system: a crafted checkpoint (loading it must not run the command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _avsl_run(root: Path, name: str, config=None, weights: bytes | None = None, weights_file: str = "model.pt"):
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config or _AVSL_CONFIG))
    if weights is None:
        torch.save({"not": torch.zeros(1)}, run / weights_file)
    else:
        (run / weights_file).write_bytes(weights)
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(d / "q.png")
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(d / "r.png")
    (d / "garbage.png").write_bytes(rng.integers(0, 255, 300, dtype=np.uint8).tobytes())
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes((d / "q.png").read_bytes()[:40])
    (d / "notes.txt").write_text("not an image\n")
    (d / "bomb.png").write_bytes(_png_header(30000, 30000))        # 900 M pixels: PIL's DecompressionBombError
    (d / "big.png").write_bytes(_png_header(10000, 10000))         # 100 M pixels: PIL's DecompressionBombWarning
    (d / "folder.png").mkdir()
    (d / "dangling").symlink_to(d / "no-such-target")
    (d / "models").mkdir()
    (d / "models" / "cli_err_models.py").write_text(_USER_MODELS)
    (d / "models" / "cli_err_broken.py").write_text("raise RuntimeError('module exploded at import')\n")
    (d / "models" / "cli_err_syntax.py").write_text("def f(:\n")
    (d / "models" / "cli_err_exit.py").write_text("import sys\nsys.exit(3)\n")
    runs = d / "runs"
    runs.mkdir()
    _avsl_run(runs, "ok")
    good = (runs / "ok" / "model.pt").read_bytes()
    _avsl_run(runs, "empty_weights", weights=b"")
    _avsl_run(runs, "truncated_weights", weights=good[: len(good) // 2])
    _avsl_run(runs, "garbage_weights", weights=rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    _avsl_run(runs, "garbage_config", config="{not json")
    _avsl_run(runs, "list_config", config="[1, 2]")
    _avsl_run(runs, "mining_config", config={"task": "mining"})
    _avsl_run(runs, "missing_keys", config={"task": "avsl", "backbone": "shapes"})
    _avsl_run(runs, "bad_dim", config={**_AVSL_CONFIG, "embedding_dim": -3})
    _avsl_run(runs, "huge_image", config={**_AVSL_CONFIG, "image_size": 100000})
    _avsl_run(runs, "bad_backbone", config={**_AVSL_CONFIG, "backbone": "vgg"})
    _avsl_run(runs, "wrong_weights")  # a valid torch file without the model's entries
    (runs / "a_file").write_text("x")
    evil = {"model": _RunsCode(f"touch {d}/PWNED")}
    _avsl_run(runs, "crafted_checkpoint", weights_file="checkpoint.pt")
    torch.save(evil, runs / "crafted_checkpoint" / "checkpoint.pt")
    train_runs = d / "train"
    train_runs.mkdir()
    (train_runs / "no_ckpt").mkdir()
    (train_runs / "bad_ckpt").mkdir()
    (train_runs / "bad_ckpt" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (train_runs / "empty_ckpt").mkdir()
    (train_runs / "empty_ckpt" / "checkpoint.pt").write_bytes(b"")
    (train_runs / "crafted_ckpt").mkdir()
    torch.save(evil, train_runs / "crafted_ckpt" / "checkpoint.pt")
    return d


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if "__pycache__" not in p.parts}


# ------------------------------------------------------------------ the table
# (id, command words, argv (with {d}: the inputs folder, {out}: a fresh output path), expected text in the message)
E = "explain"
X = "explain-avsl"
EX = ["explain", "{d}/q.png", "{d}/r.png", "--out", "{out}"]
EXM = EX + ["--model", "cli_err_models:good"]
AV = ["explain-avsl", "{d}/q.png", "{d}/r.png", "--out", "{out}", "--run"]
TM = ["train", "mining", "--data", "shapesworld", "--out", "{out}"]
TA = ["train", "avsl", "--data", "shapesworld", "--out", "{out}"]
TS = ["train", "sane", "--data", "shapesworld", "--out", "{out}"]

CASES = [
    # images: missing, folders, garbage, empty, truncated, not an image, bombs, unicode names
    ("image-missing", E, EXM[:2] + ["{d}/nope.jpg"] + EXM[3:], "nope.jpg"),
    ("image-folder", E, EXM[:2] + ["{d}/folder.png"] + EXM[3:], "folder.png is a directory"),
    ("image-garbage", E, EXM[:2] + ["{d}/garbage.png"] + EXM[3:], "garbage.png is not a readable image"),
    ("image-empty", E, EXM[:2] + ["{d}/empty.png"] + EXM[3:], "empty.png is not a readable image"),
    ("image-truncated", E, EXM[:2] + ["{d}/truncated.png"] + EXM[3:], "truncated.png is not a readable image"),
    ("image-text", E, ["explain", "{d}/notes.txt", "{d}/r.png", "--out", "{out}"], "notes.txt is not a readable"),
    ("image-bomb", E, EX[:2] + ["{d}/bomb.png"] + EX[3:], "bomb.png: Image size (900000000 pixels) exceeds"),
    ("image-big", E, EX[:2] + ["{d}/big.png"] + EX[3:], "big.png: Image size (100000000 pixels) exceeds"),
    ("image-unicode-missing", E, EX[:2] + ["{d}/ünïcödé 图像 ✓.png"] + EX[3:], "ünïcödé 图像 ✓.png"),
    ("image-devnull", E, EX[:2] + ["/dev/null"] + EX[3:], "/dev/null is not a regular file"),
    ("image-control-characters", E, EX[:2] + ["{d}/r\x1b[31m\n.png"] + EX[3:], "r\\x1b[31m .png"),
    ("image-nul", E, EX[:2] + ["{d}/r\x00.png"] + EX[3:], "r\\x00.png"),
    ("image-name-too-long", E, EX[:2] + ["{d}/" + "i" * 300 + ".png"] + EX[3:], "File name too long"),
    ("avsl-image-bomb", X, ["explain-avsl", "{d}/bomb.png", "{d}/r.png", "--out", "{out}", "--run", "{d}/runs/ok"],
     "bomb.png"),
    # --out: a file, inside a file, unwritable, empty, not a report
    ("out-is-file", E, EX[:4] + ["{d}/notes.txt"], "is an existing file, not a directory"),
    ("out-inside-file", E, EX[:4] + ["{d}/notes.txt/report"], "notes.txt is not a directory"),
    ("out-unwritable-proc", E, EX[:4] + ["/proc/whymatch-cli-test/report"], "cannot be written"),
    ("out-empty", E, EX[:4] + [""], "argument --out: must be a directory path"),
    ("out-name-too-long", E, EX[:4] + ["{d}/" + "o" * 300 + "/report"], "File name too long"),
    ("train-out-name-too-long", "train avsl", TA[:5] + ["{d}/" + "o" * 300], "File name too long"),
    ("out-broken-symlink", E, EX[:4] + ["{d}/dangling"], "which does not exist"),
    ("train-out-broken-symlink", "train mining", TM[:5] + ["{d}/dangling"], "broken symbolic link"),
    ("demo-refs-over-class", "demo", ["demo", "--out", "{out}", "--refs", "50"], "k_refs must be <= 9"),
    ("out-not-a-report", E, EX[:4] + ["{d}/runs"], "not a whymatch report"),
    ("demo-out-is-file", "demo", ["demo", "--out", "{d}/notes.txt"], "is an existing file"),
    ("avsl-out-inside-file", X, ["explain-avsl", "{d}/q.png", "{d}/r.png", "--out", "{d}/q.png/x", "--run",
                                 "{d}/runs/ok"], "q.png is not a directory"),
    ("train-out-is-file", "train mining", TM[:5] + ["{d}/notes.txt"], "is an existing file"),
    ("train-out-inside-file", "train avsl", TA[:5] + ["{d}/notes.txt/run"], "which is a file"),
    ("sane-out-unwritable", "train sane", TS[:5] + ["/proc/whymatch-cli-test"], "cannot be written"),
    # sizes and counts
    ("size-zero", E, EX + ["--size", "0"], "argument --size: must be an integer in [8, 4096], got '0'"),
    ("size-huge", E, EX + ["--size", "30000"], "got '30000'"),
    ("size-text", E, EX + ["--size", "big"], "argument --size"),
    ("avsl-size-huge", X, AV + ["{d}/runs/ok", "--size", "99999"], "argument --size"),
    ("n-masks-negative", E, EX + ["--n-masks", "-5"], "argument --n-masks"),
    ("lime-samples-zero", E, EX + ["--lime-samples", "0"], "argument --lime-samples"),
    ("mask-iters-huge", E, EX + ["--mask-iters", "10000000000"], "argument --mask-iters"),
    ("batch-size-zero", E, EX + ["--batch-size", "0"], "argument --batch-size"),
    ("window-negative", E, EX + ["--window", "-2"], "argument --window"),
    ("stride-float", E, EX + ["--stride", "2.5"], "argument --stride"),
    ("seed-negative", "demo", ["demo", "--out", "{out}", "--seed", "-1"], "argument --seed"),
    ("window-over-size", E, EXM + ["--size", "16", "--window", "32"], "--window must be <= the image side 16"),
    ("batch-over-memory", E, EXM + ["--size", "4096", "--batch-size", "65536", "--n-masks", "65536"],
     "more than this machine's"),
    ("demo-queries-zero", "demo", ["demo", "--out", "{out}", "--queries", "0"], "argument --queries"),
    ("demo-refs-huge", "demo", ["demo", "--out", "{out}", "--refs", "100000"], "argument --refs"),
    ("avsl-top-zero", X, AV + ["{d}/runs/ok", "--top", "0"], "argument --top"),
    ("avsl-top-over-nodes", X, AV + ["{d}/runs/ok", "--top", "9"], "--top must be <= 8"),
    ("train-epochs-zero", "train mining", TM + ["--epochs", "0"], "argument --epochs"),
    ("train-batch-p-one", "train mining", TM + ["--batch-p", "1"], "argument --batch-p"),
    ("train-batch-k-zero", "train avsl", TA + ["--batch-k", "0"], "argument --batch-k"),
    ("train-batch-over-data", "train mining", TM + ["--n-train", "100", "--batch-p", "20", "--batch-k", "10"],
     "200 images per batch, more than the 100 training images"),
    ("train-workers-negative", "train mining", TM + ["--num-workers", "-1"], "argument --num-workers"),
    ("train-image-size-huge", "train avsl", TA + ["--image-size", "100000"], "argument --image-size"),
    ("train-embedding-dim-huge", "train avsl", TA + ["--embedding-dim", "1000000000"], "argument --embedding-dim"),
    ("train-n-train-zero", "train mining", TM + ["--n-train", "0"], "argument --n-train"),
    ("train-n-train-over-memory", "train mining", TM + ["--n-train", "9000000", "--image-size", "4096"],
     "more than this machine's"),
    ("sane-k-maps-zero", "train sane", TS + ["--k-maps", "0"], "argument --k-maps"),
    ("sane-saliency-size-zero", "train sane", TS + ["--saliency-size", "0"], "argument --saliency-size"),
    ("sane-n-val-negative", "train sane", TS + ["--n-val", "-10"], "argument --n-val"),
    # floats: NaN, inf, out of range
    ("lr-nan", "train mining", TM + ["--lr", "nan"], "argument --lr: must be a finite number > 0 and <= 100, got 'nan'"),
    ("lr-zero", "train avsl", TA + ["--lr", "0"], "argument --lr"),
    ("lr-huge", "train avsl", TA + ["--lr", "1e5"], "argument --lr"),
    ("loss-lr-overflows-float32", "train mining", TM + ["--loss-lr", "1e300"], "argument --loss-lr"),
    ("group-lr-inf", "train mining", TM + ["--group-lr", "head=inf"], "argument --group-lr"),
    ("alpha-overflows-float32", "train mining", TM + ["--alpha", "1e39"], "argument --alpha"),
    ("gamma-inf", "train mining", TM + ["--gamma", "inf"], "argument --gamma"),
    ("gamma-negative", "train mining", TM + ["--gamma", "-1"], "argument --gamma"),
    ("alpha-zero", "train mining", TM + ["--alpha", "0"], "argument --alpha"),
    ("beta-nan", "train mining", TM + ["--beta", "NaN"], "argument --beta"),
    ("weight-decay-negative", "train mining", TM + ["--weight-decay", "-0.1"], "argument --weight-decay"),
    ("momentum-over-one", "train avsl", TA + ["--momentum", "1.5"], "argument --momentum"),
    ("neg-margin-inf", "train avsl", TA + ["--neg-margin", "-inf"], "argument --neg-margin"),
    ("level-weights-nan", "train avsl", TA + ["--level-weights", "1,nan,1"], "argument --level-weights"),
    ("lr-decay-zero", "train mining", TM + ["--lr-decay", "0"], "argument --lr-decay"),
    ("sane-temperature-zero", "train sane", TS + ["--temperature", "0"], "argument --temperature"),
    ("sane-lam-nan", "train sane", TS + ["--lam", "nan"], "argument --lam"),
    ("sane-lr-decay-over-one", "train sane", TS + ["--lr-decay", "1.5"], "argument --lr-decay"),
    # enums, devices, unknown options, missing arguments
    ("bad-method", E, EX + ["--method", "rise,grad"], "argument --method"),
    ("bad-lime-segments", E, EX + ["--lime-segments", "felzenszwalb"], "invalid choice"),
    ("bad-pretrained", E, EX + ["--pretrained", "vgg16"], "invalid choice"),
    ("model-and-pretrained", E, EXM + ["--pretrained", "efficientnet-lite0"], "not both"),
    ("bad-weights-choice", X, AV + ["{d}/runs/ok", "--weights", "last"], "invalid choice"),
    ("bad-backbone", "train mining", TM + ["--backbone", "vgg"], "invalid choice"),
    ("device-tpu", "train mining", TM + ["--device", "tpu"], "argument --device"),
    ("device-garbage", X, AV + ["{d}/runs/ok", "--device", "cuda:x"], "argument --device"),
    ("device-cuda-99", "train avsl", TA + ["--device", "cuda:99"], "argument --device"),
    ("unknown-option", E, EX + ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("info-unknown-option", "info", ["info", "--bogus"], "unrecognized arguments"),
    ("explain-no-out", E, ["explain", "{d}/q.png", "{d}/r.png"], "required: --out"),
    ("train-no-task", "train", ["train"], "required"),
    ("no-command", "", [], "required"),
    ("milestones-decreasing", "train mining", TM + ["--scheduler", "step", "--milestones", "3,1"], "--milestones"),
    ("group-lr-unknown", "train avsl", TA + ["--group-lr", "trunk=1e-4"], "unknown group"),
    # --data
    ("data-unknown", "train mining", ["train", "mining", "--data", "imagenet", "--out", "{out}"], "argument --data"),
    ("data-no-path", "train avsl", ["train", "avsl", "--data", "cub", "--out", "{out}"], "cub:/path/to/cub"),
    ("data-missing-root", "train mining", ["train", "mining", "--data", "sop:{d}/no-sop", "--out", "{out}"],
     "data root not found"),
    ("data-root-is-file", "train mining", ["train", "mining", "--data", "cars196:{d}/notes.txt", "--out", "{out}"],
     "is not a directory"),
    ("data-shapesworld-path", "train mining", ["train", "mining", "--data", "shapesworld:/x", "--out", "{out}"],
     "takes no path"),
    ("sane-data-unknown", "train sane", ["train", "sane", "--data", "cub:/x", "--out", "{out}"], "argument --data"),
    # --model / --similarity specs
    ("model-no-colon", E, EX + ["--model", "toy_models"], "package.module:factory"),
    ("model-not-identifier", E, EX + ["--model", "a b:c"], "package.module:factory"),
    ("model-module-missing", E, EX + ["--model", "no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    ("model-module-raises", E, EX + ["--model", "cli_err_broken:f"], "module exploded at import"),
    ("model-module-syntax", E, EX + ["--model", "cli_err_syntax:f"], "SyntaxError"),
    ("model-no-attribute", E, EX + ["--model", "cli_err_models:nope"], "has no callable 'nope'"),
    ("model-not-callable", E, EX + ["--model", "cli_err_models:not_callable"], "has no callable 'not_callable'"),
    ("model-factory-raises", E, EX + ["--model", "cli_err_models:raises"], "RuntimeError: factory exploded"),
    ("model-module-exits", E, EX + ["--model", "cli_err_exit:f"], "SystemExit: 3"),
    ("model-factory-exits", E, EX + ["--model", "cli_err_models:exits"], "raised SystemExit: 4"),
    ("model-returns-int", E, EX + ["--model", "cli_err_models:returns_int"], "got int"),
    ("sane-similarity-spec", "train sane", TS + ["--similarity", "nocolon"], "argument --similarity"),
    ("sane-similarity-module-missing", "train sane", TS + ["--similarity", "no_such_module_xyz:f"],
     "--similarity: cannot import module 'no_such_module_xyz'"),
    ("sane-similarity-no-attribute", "train sane", TS + ["--similarity", "cli_err_models:nope"],
     "--similarity: module 'cli_err_models' has no callable 'nope'"),
    # --run: missing, a file, garbage configs and weights
    ("run-missing", X, AV + ["{d}/runs/nope"], "config.json is missing"),
    ("run-is-file", X, AV + ["{d}/runs/a_file"], "is a file"),
    ("run-config-garbage", X, AV + ["{d}/runs/garbage_config"], "not valid JSON"),
    ("run-config-list", X, AV + ["{d}/runs/list_config"], "must hold a JSON object, got list"),
    ("run-config-mining", X, AV + ["{d}/runs/mining_config"], "not 'avsl'"),
    ("run-config-missing-keys", X, AV + ["{d}/runs/missing_keys"], ("missing_keys/config.json", "embedding_dim")),
    ("run-config-bad-dim", X, AV + ["{d}/runs/bad_dim"], ("bad_dim/config.json", "embedding_dim", "-3")),
    ("run-config-huge-image", X, AV + ["{d}/runs/huge_image"], ("huge_image/config.json", "image_size", "100000")),
    ("run-config-bad-backbone", X, AV + ["{d}/runs/bad_backbone"], ("bad_backbone/config.json", "backbone", "vgg")),
    ("run-weights-empty", X, AV + ["{d}/runs/empty_weights"], "model.pt: the file is empty"),
    ("run-weights-truncated", X, AV + ["{d}/runs/truncated_weights"], "model.pt: truncated or not a torch file"),
    ("run-weights-garbage", X, AV + ["{d}/runs/garbage_weights"], "model.pt: truncated or not a torch file"),
    ("run-crafted-checkpoint", X, AV + ["{d}/runs/crafted_checkpoint", "--weights", "checkpoint"],
     "could run code"),
    ("run-weights-best-missing", X, AV + ["{d}/runs/ok", "--weights", "best"], "best.pt is missing"),
    ("run-weights-wrong-keys", X, AV + ["{d}/runs/wrong_weights"], "wrong_weights/model.pt"),
    # --resume
    ("resume-no-checkpoint", "train mining", TM[:5] + ["{d}/train/no_ckpt", "--resume"], "checkpoint.pt is missing"),
    ("resume-garbage-checkpoint", "train avsl", TA[:5] + ["{d}/train/bad_ckpt", "--resume"],
     "checkpoint.pt: truncated or not a torch file"),
    ("resume-crafted-checkpoint", "train mining", TM[:5] + ["{d}/train/crafted_ckpt", "--resume"], "could run code"),
    ("resume-empty-checkpoint", "train sane", TS[:5] + ["{d}/train/empty_ckpt", "--resume"],
     "checkpoint.pt: the file is empty"),
]


def _argv(words, d: Path, out: Path) -> list[str]:
    return [w.replace("{d}", str(d)).replace("{out}", str(out)) for w in words]


def _check_one_line(err: str, command: str, expected: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"whymatch {command}: error: " if command else "whymatch: error: "
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in lines[0], err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line_is_one_line_and_writes_nothing(case, files, tmp_path, capsys, monkeypatch):
    _, command, words, expected = case
    monkeypatch.syspath_prepend(str(files / "models"))
    monkeypatch.chdir(tmp_path)  # a relative default (demo's whymatch-demo) would land here
    out = tmp_path / "out"
    before = _snapshot(files)
    t0 = time.perf_counter()
    rc = cli.main(_argv(words, files, out))
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    _check_one_line(err, command, expected)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no side directory left
    assert _snapshot(files) == before  # also: no file appeared (a crafted checkpoint's command would make PWNED)
    assert seconds < 20, f"took {seconds:.1f}s: the error must come before any expensive work"


def test_the_table_covers_every_command():
    commands = {c[1] for c in CASES}
    assert {"info", "demo", "explain", "explain-avsl", "train mining", "train avsl", "train sane"} <= commands
    assert len(CASES) >= 40


# ------------------------------------------------------------------ the last resort and interrupts
@pytest.mark.parametrize("exc, rc, words", [
    (KeyError("layer9"), 2, ["KeyError", "missing key 'layer9'", "WHYMATCH_DEBUG=1"]),
    (RuntimeError("CUDA error: an illegal memory access\n\nmore text"), 2, ["RuntimeError", "illegal memory"]),
    (MemoryError(), 2, ["out of memory"]),
    (PermissionError(13, "Permission denied", "/some/where"), 2, ["Permission denied: /some/where"]),
    (ZeroDivisionError("division by zero"), 2, ["ZeroDivisionError: division by zero", "WHYMATCH_DEBUG=1"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
])
def test_unexpected_errors_are_one_line(exc, rc, words, monkeypatch, capsys):
    def boom(args):
        raise exc
    monkeypatch.setattr(cli.info, "cmd_info", boom)
    monkeypatch.delenv("WHYMATCH_DEBUG", raising=False)
    assert cli.main(["info"]) == rc
    err = capsys.readouterr().err
    line = _check_one_line(err, "info", words[0])
    for w in words[1:]:
        assert w in line, line


def test_whymatch_debug_shows_the_traceback(monkeypatch):
    def boom(args):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(cli.info, "cmd_info", boom)
    monkeypatch.setenv("WHYMATCH_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["info"])


def test_help_and_version_exit_zero(capsys):
    assert cli.main(["--version"]) == 0
    assert "whymatch" in capsys.readouterr().out
    assert cli.main(["explain", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_unwritable_directory_by_permissions(tmp_path, files, capsys):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes anywhere: permissions do not apply (the /proc cases cover unwritable folders)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for argv, command in [(["explain", f"{files}/q.png", f"{files}/r.png", "--out", str(locked / "r")], "explain"),
                              (["train", "mining", "--data", "shapesworld", "--out", str(locked / "run")],
                               "train mining")]:
            assert cli.main(argv) == 2
            _check_one_line(capsys.readouterr().err, command, "locked")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ through a real terminal
def _run_cli(args: list[str], files: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(files / "models"), os.environ.get("PYTHONPATH", "")])}
    env.pop("WHYMATCH_DEBUG", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "whymatch.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("words, command, expected", [
    (["explain", "{d}/q.png", "{d}/bomb.png", "--out", "{out}"], "explain", "bomb.png"),
    (["explain", "{d}/q.png", "{d}/r.png", "--out", "{out}", "--size", "30000"], "explain", "--size"),
    (["explain-avsl", "{d}/q.png", "{d}/r.png", "--out", "{out}", "--run", "{d}/runs/truncated_weights"],
     "explain-avsl", "truncated"),
], ids=["bomb", "huge-size", "truncated-weights"])
def test_no_traceback_reaches_the_terminal(words, command, expected, files, tmp_path):
    out = tmp_path / "out"
    res = _run_cli(_argv(words, files, out), files)
    assert res.returncode == 2, res.stderr
    _check_one_line(res.stderr, command, expected)
    assert not out.exists()


def test_interrupt_in_a_real_process(files):
    code = ("import sys\nfrom whymatch import cli\n"
            "def boom(args):\n    raise KeyboardInterrupt\n"
            "cli.info.cmd_info = boom\nsys.exit(cli.main(['info']))\n")
    res = _run_cli([], files, code)
    assert res.returncode == 130
    _check_one_line(res.stderr, "info", "interrupted")


def test_warnings_are_one_line_and_a_failure_shows_only_its_error(monkeypatch, capsys):
    import warnings

    def warn_then(result):
        def cmd(args):
            warnings.warn("the maps are constant\n  at layer 'x'", RuntimeWarning, stacklevel=1)
            if isinstance(result, BaseException):
                raise result
            return result
        return cmd

    monkeypatch.delenv("WHYMATCH_DEBUG", raising=False)
    monkeypatch.setattr(cli.info, "cmd_info", warn_then(0))
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "whymatch info: warning: RuntimeWarning: the maps are constant   at layer 'x'"]
    monkeypatch.setattr(cli.info, "cmd_info", warn_then(ValueError("--thing must be 3, got 4")))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.splitlines() == ["whymatch info: error: --thing must be 3, got 4"]
