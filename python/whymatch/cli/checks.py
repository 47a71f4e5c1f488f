"""Checks before any work: output directories, input images, run files, memory (each fails naming the path or the
option)."""

from __future__ import annotations

import os
from pathlib import Path

from .._checks import first_line as _first_line


def _check_out(path: str | os.PathLike, option: str = "--out", *, replaced: bool = True) -> Path:
    """Fail now, naming the path, if ``path`` cannot become an output directory.

    It must be a directory or not exist yet. Where new entries will appear (the nearest existing folder above a
    new directory; for ``replaced`` directories, reports that are written beside themselves and swapped in, the
    parent of an existing one) must take them: tried by creating and removing an empty folder, so permissions,
    read-only file systems and root on special file systems all answer. An existing directory that files go into
    (``replaced=False``: training runs) is checked with ``os.access`` and not touched. Nothing is left behind.
    """
    import tempfile

    p = Path(path)
    try:
        if p.is_symlink() and not p.exists():
            raise ValueError(f"{option} {p} is a broken symbolic link")
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {p} is an existing file, not a directory")
        ancestor = p if p.is_dir() else p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            if ancestor.is_symlink():
                raise ValueError(f"{option} {p} lies under a broken symbolic link {ancestor}")
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise ValueError(f"{option} {p} lies inside {ancestor}, which is a file, not a directory")
        if p.is_dir() and not replaced:  # files go into it: it must let us in and write (not touched now)
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {p} cannot be written: permission denied")
            return p
        folder = p.parent if p.is_dir() else ancestor  # where new entries appear: the side directory, or p itself
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".whymatch-probe-", dir=folder))
        except OSError as exc:
            raise ValueError(f"{option} {p} cannot be written: cannot create entries in {folder} "
                             f"({exc.strerror or type(exc).__name__})") from None
    except OSError as exc:  # a name too long, a loop of links, ...
        raise ValueError(f"{option} {p} cannot be used: {exc.strerror or exc}") from None
    return p


def _check_report_out(path: str) -> Path:
    """--out of a report: :func:`whymatch.io.check_output_dir`'s rules (a new, empty or report directory with a
    writable parent), then a real write test of the parent (:func:`_check_out`)."""
    from ..io import check_output_dir

    check_output_dir(path, "--out")
    return _check_out(path)


def _check_images(paths) -> None:
    """Fail now, naming the file, unless every path is a regular file whose image header PIL reads and verifies
    (cheap: nothing is decoded), within PIL's pixel limit (larger: refused as a possible decompression bomb)."""
    import warnings

    from PIL import Image

    for path in paths:
        p = Path(path)
        try:
            exists, is_dir, is_file = p.exists(), p.is_dir(), p.is_file()
        except (OSError, ValueError) as exc:  # a name too long, a NUL character, ...
            raise ValueError(f"cannot read image {p}: {getattr(exc, 'strerror', None) or exc}") from None
        if not exists:
            raise FileNotFoundError(f"image file not found: {p}")
        if is_dir:
            raise ValueError(f"image {p} is a directory, not a file")
        if not is_file:  # a FIFO would block, a device never ends
            raise ValueError(f"image {p} is not a regular file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    im.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"refused image {p}: {_first_line(exc)}") from None
        except PermissionError as exc:
            raise ValueError(f"cannot read image {p}: {exc.strerror}") from None
        except Exception as exc:  # noqa: BLE001 (PIL raises OSError, SyntaxError, struct.error ... for bad files)
            raise ValueError(f"{p} is not a readable image ({type(exc).__name__}: {_first_line(exc)})") from None


def _check_index_path(path: str) -> None:
    """--index: an existing regular file (reused) or a new file whose folder exists and takes files."""
    p = Path(path)
    if p.exists():
        if not p.is_file():
            raise ValueError(f"--index {p} is not a regular file")
        return
    if not p.parent.is_dir():
        raise ValueError(f"--index {p}: its folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--index {p} cannot be written: permission denied in {p.parent}")


def _physical_memory() -> int | None:
    """Bytes of RAM of this machine, None when unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(need: int, what: str, advice: str) -> None:
    """Fail now when ``need`` bytes for one thing alone exceed this machine's RAM."""
    total = _physical_memory()
    if total and need > total:
        raise ValueError(f"{what} needs {need / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB: "
                         f"{advice}")


def _check_avsl_run(run_dir: str, weights: str, top: int) -> None:
    """Fail now, naming the file, unless RUN_DIR holds an AVSL run's config.json and a torch weights file that is
    not empty or truncated, and --top fits its nodes per level. The config's every value and the weights' content
    are checked by :func:`whymatch.jobs.load_avsl_run` (before it builds the model, and when it loads them)."""
    from ..io import FileFormatError, read_json_file
    from ..jobs import _AVSL_WEIGHTS

    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ValueError(f"--run {run} is a file, not the --out directory of `whymatch train avsl`")
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"not an AVSL training run: {cfg_path} is missing")
    cfg = read_json_file(cfg_path, "AVSL run config")
    if not isinstance(cfg, dict):
        raise FileFormatError(f"AVSL run config {cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("task") != "avsl":
        raise ValueError(f"{cfg_path} is a {cfg.get('task')!r} run, not 'avsl'")
    dim = cfg.get("embedding_dim")
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1 and top > dim:
        raise ValueError(f"--top must be <= {dim} (the nodes per level of the run {run}), got {top}")
    w_path = run / _AVSL_WEIGHTS[weights]
    if not w_path.is_file():
        hint = (" (written when training ends; --weights best or checkpoint use the files saved each epoch)"
                if weights == "model" else "")
        raise FileNotFoundError(f"not an AVSL training run: {w_path} is missing{hint}")
    _check_torch_file(w_path, "AVSL weights")


def _check_torch_file(path: Path, what: str) -> None:
    """Fail now, naming the path, when a file torch.save should have written is empty, truncated or something
    else (cheap: its first bytes and its zip directory; the content is checked when it is loaded)."""
    import zipfile

    from ..io import FileFormatError

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2)
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise FileFormatError(f"cannot load {what} {path}: the file is empty")
    if not is_zip and not head.startswith(b"\x80"):  # torch.save's zip archive, or its legacy pickle format
        raise FileFormatError(f"cannot load {what} {path}: truncated or not a torch file")


def _check_train_run(cfg) -> None:
    """What a `whymatch train` command can check before it renders or reads any data: the output directory,
    the checkpoint --resume continues from, and the memory a generated data set would take."""
    out = _check_out(cfg.out, replaced=False)
    if cfg.resume:
        ckpt = out / "checkpoint.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to continue from: {ckpt} is missing")
        _check_torch_file(ckpt, "checkpoint")
    if str(cfg.data).partition(":")[0] == "shapesworld":
        side = cfg.image_size or 96
        n = cfg.n_train + getattr(cfg, "n_test", getattr(cfg, "n_val", 0))
        per_batch = getattr(cfg, "batch_p", 1) * getattr(cfg, "batch_k", 1)
        if per_batch > cfg.n_train:
            raise ValueError(f"--batch-p x --batch-k = {cfg.batch_p} x {cfg.batch_k} = {per_batch} images per batch, "
                             f"more than the {cfg.n_train} training images (--n-train)")
        _check_memory(n * 3 * side * side, f"ShapesWorld with {n} images of {side} x {side}",
                      "lower --n-train / --n-test or --image-size")


def _check_explain_settings(args, size: int, methods: tuple[str, ...]) -> None:
    """Option combinations of `whymatch explain` that only the image side decides, checked before any work."""
    for opt, v in (("--window", args.window), ("--stride", args.stride)):  # checked when given, whatever the methods
        if v is not None and v > size:
            raise ValueError(f"{opt} must be <= the image side {size} (--size), got {v}")
    n_images = len(args.references) + 1
    _check_memory(n_images * 3 * size * size * 4, f"{n_images} images of {size} x {size} (--size)",
                  "explain fewer references at once or lower --size")
    per_batch = min(args.batch_size, max(args.n_masks, args.lime_samples))
    _check_memory(per_batch * 3 * size * size * 4, f"a batch of {per_batch} images of {size} x {size} "
                  f"(--batch-size, --size)", "lower --batch-size or --size")
