"""Image loading and output that is never left half-written.

Images: :func:`load_image` / :func:`pil_to_tensor` read every PIL mode by its real range (see
:func:`pil_to_tensor`) or refuse it by name. Reports: :func:`atomic_output_dir` builds a directory
beside the destination and swaps it in whole; :func:`check_output_dir` says cheaply, before any work,
whether a destination can be written. Files: :func:`atomic_write` and friends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["load_image", "open_image", "pil_to_tensor", "pil_to_rgb", "check_image_size", "check_output_dir",
           "atomic_output_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save",
           "load_torch_file", "read_json_file", "FileFormatError", "REPORT_MARKER"]


# ------------------------------------------------------------------ images
# Modes whose channels are 8-bit: PIL's own conversion to RGB is exact for them (alpha is dropped;
# palette colours, CMYK, YCbCr, LAB, HSV and premultiplied alpha are converted by PIL).
_EIGHT_BIT = frozenset({"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_SUPPORTED = ("1, L, LA, La, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV (8-bit), "
              "I;16, I;16B, I;16L, I;16N (16-bit), I (32-bit int holding 16-bit data), F (float in [0, 1])")


def _max_pixels() -> int | None:
    """PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; None = the user lifted it)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else int(limit)


def check_image_size(size: object, name: str = "size") -> tuple[int, int]:
    """``size`` (an int side or an (H, W) pair of ints) as (H, W), checked before anything is allocated.

    Raises:
        TypeError: not an int or a pair of ints (bools and floats are refused).
        ValueError: a side < 1, or H * W above PIL's decompression-bomb limit
            (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels by default: 1 GiB as float32 RGB).
    """
    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if is_int(size):
        pair: tuple = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(is_int(v) for v in size):
        pair = tuple(size)
    else:
        raise TypeError(f"{name} must be an int or an (H, W) pair of ints, got {size!r}")
    h, w = int(pair[0]), int(pair[1])
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be >= 1 on each side, got {size!r}")
    limit = _max_pixels()
    if limit is not None and h * w > limit:
        raise ValueError(f"{name} ({h}, {w}) is {h * w:,} pixels, above the limit of {limit:,} "
                         "(PIL.Image.MAX_IMAGE_PIXELS)")
    return h, w


def _as_float_channels(image: Image.Image) -> tuple[np.ndarray, bool]:
    """(H, W, C) float32 in [0, 1] (C = 1 or 3) and whether it came from 8-bit channels."""
    mode = image.mode
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"image must not be empty, got {w} x {h} pixels (mode {mode})")
    if mode in _EIGHT_BIT:
        if mode == "La":
            image = image.convert("LA")
        elif mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns when a palette image with transparency goes to RGB directly
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).astype(np.float32) / 255.0, True
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(image).astype(np.float32) / 65535.0  # numpy reads the byte order of I;16B etc.
        return arr[..., None], False
    if mode == "I":
        raw = np.asarray(image)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"image of mode 'I' (32-bit int) must hold 16-bit values in [0, 65535], got values in "
                             f"[{lo}, {hi}]: their range is unknown (convert it to 'F' in [0, 1] or to 8/16 bits)")
        return (raw.astype(np.float32) / 65535.0)[..., None], False
    if mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"image of mode 'F' (float) must be finite, got {int((~np.isfinite(arr)).sum())} "
                             "NaN or infinite pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image of mode 'F' (float) must hold values in [0, 1], got values in [{lo:g}, {hi:g}]")
        return arr[..., None], False
    raise ValueError(f"image mode {mode!r} is not supported; supported modes: {_SUPPORTED}")


def pil_to_tensor(image: Image.Image) -> Tensor:
    """A PIL image as a float32 RGB tensor in [0, 1], every mode by its real range.

    - 8-bit modes (1, L, LA, La, P, PA, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV): PIL's
      conversion to RGB, divided by 255; alpha is dropped (colours as stored, not blended).
    - 16-bit grey (I;16, I;16B, I;16L, I;16N): divided by 65535, the full range of 16 bits
      (never clipped to 8 bits).
    - 32-bit int (I): PIL decodes 16-bit PGM/PPM and some TIFFs to this mode with values in
      [0, 65535], so it is divided by 65535; values outside [0, 65535] (true 32-bit data, whose
      range is unknown) are refused, never clipped.
    - float (F): taken as is, so it must be finite and in [0, 1] (refused otherwise).
    - any other mode is refused by name. Grey images give three equal channels.

    The pixels are taken as given: EXIF orientation and frames are :func:`open_image`'s business.

    Args:
        image: a PIL image.

    Returns:
        (3, H, W) float32 in [0, 1].

    Raises:
        TypeError: not a PIL image. ValueError: empty, unsupported mode or out-of-range values.
    """
    from PIL import Image  # noqa: F811 (the runtime import; the one above is for annotations)

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    arr, _ = _as_float_channels(image)
    return _chw(arr)


def _chw(arr: np.ndarray) -> Tensor:
    """(H, W, 1 or 3) float array -> (3, H, W) float32 tensor that owns its memory."""
    arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return (t.expand(3, -1, -1) if t.shape[0] == 1 else t).contiguous()


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any supported mode as an 8-bit RGB PIL image, by the rules of :func:`pil_to_tensor`.

    For code that needs a PIL RGB image (transforms): use this instead of ``image.convert("RGB")``,
    which clips 16-bit images to white. Always a new image (an RGB one is copied).
    """
    from PIL import Image  # noqa: F811

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image.copy()  # a new image, like convert(): the caller may close the source
    arr, _ = _as_float_channels(image)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray((arr * 255.0 + 0.5).astype(np.uint8)), "RGB")


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Open and decode an image file safely: the first frame, EXIF orientation applied, in its own mode.

    Multi-frame files (GIF, APNG, multi-page TIFF) give their first frame. The EXIF orientation
    tag is applied (the picture is turned the way viewers show it). An image of more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb) is refused before it is decoded.

    Raises:
        FileNotFoundError: the path does not exist or is a directory (named).
        ValueError: not an image, truncated, empty, a decompression bomb, unreadable EXIF;
            one line naming the path.
    """
    from PIL import Image, ImageOps  # noqa: F811

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        why = " (a directory)" if p.is_dir() else " (not a regular file)" if p.exists() else ""
        raise FileNotFoundError(f"{what} file not found: {p}{why}")
    limit = _max_pixels()
    try:
        # No warnings filter here (warnings.catch_warnings is process-wide, not thread-safe): PIL itself warns
        # between the limit and twice it and raises above; the size is checked from the header, before decoding.
        with Image.open(p) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ValueError(f"{p} is an empty image ({w} x {h} pixels)")
            if limit is not None and w * h > limit:
                raise Image.DecompressionBombError(f"({w * h} pixels)")
            im.seek(0)
            im.load()
            out = ImageOps.exif_transpose(im)
            if out is im:
                out = im.copy()
            return out
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{p} is too large to decode safely (a possible decompression bomb): "
                         f"{_pixels_of(exc)} pixels, limit {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except ValueError as exc:
        if str(exc).startswith(str(p)):
            raise
        raise ValueError(f"{p} is not a readable image: {_one_line(exc)}") from None
    except MemoryError:
        raise ValueError(f"{p} is not a readable image: decoding it ran out of memory") from None
    except Exception as exc:  # noqa: BLE001 (PIL's plugins raise OSError, SyntaxError, struct.error, IndexError...)
        raise ValueError(f"{p} is not a readable image: {_one_line(exc)}") from None


def _pixels_of(exc: BaseException) -> str:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)):,}" if m else "too many"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> Tensor:
    """Read an image file as (3, H, W) float32 in [0, 1].

    Decoding follows :func:`open_image` (first frame, EXIF orientation, bomb check) and the
    conversion :func:`pil_to_tensor` (every mode by its real range; alpha dropped).

    Args:
        path: the file. A missing file (or a directory) raises FileNotFoundError, a file that
            is not a readable image ValueError; both name the path.
        size: optional (H, W) (or one int: square) to resize to (bilinear, antialiased);
            checked (:func:`check_image_size`) before the file is read.
    """
    from PIL import Image  # noqa: F811

    hw = None if size is None else check_image_size(size)
    im = open_image(path)
    try:
        arr, eight_bit = _as_float_channels(im)
        if hw is not None and (arr.shape[0], arr.shape[1]) != hw:
            h, w = hw
            if eight_bit:  # resize the 8-bit picture itself (as before; PIL rounds to 8 bits)
                rgb = Image.fromarray(np.ascontiguousarray((arr * 255.0 + 0.5).astype(np.uint8)), "RGB")
                arr = np.asarray(rgb.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
            else:  # high bit depth: resize each channel in float, the same filter
                arr = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), "F")
                                           .resize((w, h), Image.BILINEAR), dtype=np.float32)
                                for c in range(arr.shape[-1])], axis=-1).clip(0.0, 1.0)
    except ValueError as exc:
        raise ValueError(f"{Path(path)}: {exc}") from None
    finally:
        im.close()
    return _chw(arr)


# ------------------------------------------------------------------ report directories
REPORT_MARKER = ".whymatch-report"
"""File written last into every report directory: marks a directory that a later report may replace."""

_LEGACY_REPORT_FILE = re.compile(r"^(index\.html|p\d+_[A-Za-z0-9_.-]+\.png)$")  # what older reports held
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_SIDE = re.compile(r"^\.(?P<name>.+)\.whymatch-(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<t>\d+)$")
_ACTIVE: set[str] = set()          # side directories this process is using now
_ACTIVE_LOCK = threading.Lock()
_FOREIGN_STALE_S = 24 * 3600.0     # another host's side directory is stale after a day


def _side_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.whymatch-{kind}-{_HOST}-{os.getpid()}-{time.time_ns()}"


def _is_report_dir(path: Path) -> bool:
    """A directory a new report may replace: empty, marked by :data:`REPORT_MARKER`, or a report of an
    older whymatch (index.html and only PNGs named as whymatch names them, p<i>_..., no folders)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    names = {e.name for e in entries}
    if not entries or REPORT_MARKER in names:
        return True
    if "index.html" not in names:
        return False
    return all(e.is_file(follow_symlinks=False) and _LEGACY_REPORT_FILE.match(e.name) for e in entries)


def check_output_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """Check cheaply, before any expensive work, that a report can be written at ``path``.

    Nothing is created. A report replaces the directory as a whole, so an existing directory must
    be empty or a report (it holds :data:`REPORT_MARKER`, or is an older whymatch report: index.html
    and only PNGs named p<i>_...png), and must not hold the current directory. A symlink is followed
    to the directory it names.

    Returns:
        The absolute path the report will be written to (symlinks resolved).

    Raises:
        TypeError: ``path`` is not a str or os.PathLike.
        ValueError: empty, an existing file, a symlink to a file or to nothing, a directory that
            is not a report, a parent that is a file or is not writable (one line, naming the path).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    if not os.fspath(path):
        raise ValueError(f"{what} must not be empty")
    given = Path(path)
    if given.is_symlink():
        target = given.resolve()
        if not target.exists():
            raise ValueError(f"{what} {given} is a symlink to {target}, which does not exist")
        if not target.is_dir():
            raise ValueError(f"{what} {given} is a symlink to {target}, which is not a directory")
        out = target
    else:
        out = Path(os.path.abspath(given))
    if out.parent == out:
        raise ValueError(f"{what} {given} is the root of the file system")
    with contextlib.suppress(OSError):
        cwd = Path(os.getcwd()).resolve()
        if cwd == out.resolve() or out.resolve() in cwd.parents:
            raise ValueError(f"{what} {given} is or holds the current directory {cwd}; a report replaces its "
                             "directory whole: choose another one")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"{what} {given} is an existing file, not a directory")
        if not _is_report_dir(out):
            raise ValueError(f"{what} {given} is a non-empty directory that is not a whymatch report (no "
                             f"{REPORT_MARKER}); a report replaces its directory whole: choose a new or empty one")
    anc = out.parent
    while not anc.exists() and anc.parent != anc:
        if anc.is_symlink():
            raise ValueError(f"cannot create {what} {given}: {anc} is a symlink to nothing")
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"cannot create {what} {given}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {given}: {anc} is not writable")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _stale_sides(out: Path) -> list[tuple[str, int, Path]]:
    """(kind, time, path) of the side directories of ``out`` left by runs that are over."""
    found = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return found
    for e in entries:
        m = _SIDE.match(e.name)
        if not m or m.group("name") != out.name or not e.is_dir(follow_symlinks=False):
            continue
        with _ACTIVE_LOCK:
            if e.path in _ACTIVE:
                continue
        pid = int(m.group("pid"))
        if m.group("host") == _HOST:
            if pid != os.getpid() and _pid_alive(pid):
                continue
        else:
            with contextlib.suppress(OSError):
                if time.time() - e.stat(follow_symlinks=False).st_mtime < _FOREIGN_STALE_S:
                    continue
        found.append((m.group("kind"), int(m.group("t")), Path(e.path)))
    return found


def _recover(out: Path) -> None:
    """Finish what an interrupted swap left: restore the newest backup when ``out`` is missing, then
    remove the stale side directories of ``out``."""
    stale = _stale_sides(out)
    if not (out.exists() or out.is_symlink()):
        backups = sorted((t, p) for kind, t, p in stale if kind == "old")
        if backups:
            with contextlib.suppress(OSError):
                os.rename(backups[-1][1], out)
    for _, _, p in stale:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (so a swapped-in report is on disk)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(new: Path, out: Path, what: str) -> None:
    """Put the complete directory ``new`` at ``out``; at every instant ``out`` is the old or the new one
    (where renameat2 exists; elsewhere a missing ``out`` is restored from its backup by the next run)."""
    for _ in range(5):
        if out.exists() or out.is_symlink():
            if not out.is_dir() or out.is_symlink():
                raise ValueError(f"{what} {out} became a file or a symlink while the report was written")
            if not _is_report_dir(out):
                raise ValueError(f"{what} {out} is a non-empty directory that is not a whymatch report (no "
                                 f"{REPORT_MARKER}); a report replaces its directory whole: choose a new or empty one")
            if _exchange(new, out):   # new is now the old report
                shutil.rmtree(new, ignore_errors=True)
                return
            backup = _side_name(out, "old")
            with _ACTIVE_LOCK:
                _ACTIVE.add(str(backup))
            try:
                try:
                    os.rename(out, backup)
                except FileNotFoundError:
                    continue          # someone else moved it: try again
                try:
                    os.rename(new, out)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.rename(backup, out)
                    raise
                shutil.rmtree(backup, ignore_errors=True)
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE.discard(str(backup))
            return
        try:
            os.rename(new, out)
            return
        except OSError:
            if not out.exists():
                raise
            # another writer put a report there in between: replace it
    raise ValueError(f"cannot write {what} {out}: other processes keep replacing it")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a new directory beside ``out_dir`` to fill; on success it replaces ``out_dir`` whole.

    ``out_dir`` is checked first (:func:`check_output_dir`). The new directory is filled, marked
    (:data:`REPORT_MARKER`, written last), synced, then swapped with the old one in one atomic
    exchange (Linux; elsewhere rename old -> backup, new -> out, restoring the backup when the
    second rename fails), and the old one is removed. At every point ``out_dir`` holds the complete
    old report or the complete new one; on an exception the new directory is removed and
    ``out_dir`` is left as it was. Side directories of runs that died (``.<name>.whymatch-tmp-*``,
    ``.<name>.whymatch-old-*``) are cleaned up by the next run, which first restores the old
    report if a run died between the two renames.
    """
    out = check_output_dir(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the parent of out_dir {out}: {_one_line(exc)}") from None
    _recover(out)
    tmp = _side_name(out, "tmp")
    with _ACTIVE_LOCK:
        _ACTIVE.add(str(tmp))
    try:
        try:
            os.mkdir(tmp)  # 0777 less the umask: the permissions the report directory will have
        except OSError as exc:
            raise ValueError(f"cannot write out_dir {out}: {_one_line(exc)}") from None
        try:
            yield tmp
            with open(tmp / REPORT_MARKER, "w", encoding="utf-8") as f:
                f.write("whymatch report: this directory is replaced whole by the next report written here\n")
            _fsync_tree(tmp)
            _swap_in(tmp, out, "out_dir")
            _fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(str(tmp))


def _umask() -> int:
    """The process's umask (Linux: read, not set; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through a temporary file in the same folder, fsync and an atomic rename.

    ``write(f)`` fills the open binary file; if it raises, nothing is left behind and any
    previous file at ``path`` stays as it was. The file gets the permissions a plain ``open``
    would give it (0666 less the umask), or those of the file it replaces; the temporary file's
    own 0600 never shows.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = p.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # closes fd whatever happens next
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)  # the rename itself on disk


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`): a checkpoint is never half-written."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------ reading files a user may have received
class FileFormatError(ValueError):
    """A file that exists but cannot be used: refused (it would run code), truncated, or of the wrong layout.

    The message is one line that names the path and the reason.
    """


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to a paragraph)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0].rstrip(".")


def _refusal_reason(exc: BaseException) -> str:
    """One line from torch's weights_only refusal: the global it would have imported, when it names one."""
    text = str(exc)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported operand" in line or "Unsupported class" in line:
            return line.strip().rstrip(".")
    return _first_line(exc)


def _require_keys(obj: object, keys: tuple[str, ...] | None, name: str, container: str) -> None:
    """With ``keys``: ``obj`` must be a dict holding every one of them (FileFormatError naming ``name``)."""
    if keys is None:
        return
    if not isinstance(obj, dict):
        raise FileFormatError(f"{name} must hold {container}, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FileFormatError(f"{name} lacks the keys {', '.join(map(repr, missing))}")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", *, map_location: object = "cpu",
                    required_keys: tuple[str, ...] | None = None) -> object:
    """``torch.load`` a file that may come from anyone: tensors and plain containers only, never code.

    The file is read with ``weights_only=True`` (no object is unpickled beyond tensors, numbers,
    strings and plain containers), so a crafted pickle cannot run code. Every failure is one line
    naming the path.

    Args:
        path: the file.
        what: what the file is, for messages ('checkpoint', 'AVSL weights', ...).
        map_location: as for ``torch.load``.
        required_keys: when given, the file must hold a dict with these keys.

    Raises:
        FileNotFoundError: the file does not exist (or is not a file).
        FileFormatError: refused (it holds other objects: a crafted or foreign file), truncated,
            empty, not a torch file, or without the required keys.
    """
    import pickle

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise FileFormatError(f"refused to load {what} {p}: it holds objects other than tensors and plain "
                                  f"containers, which could run code ({_refusal_reason(exc)})") from None
        raise FileFormatError(f"cannot load {what} {p}: corrupted or not a torch file "
                              f"({_refusal_reason(exc)})") from None
    except EOFError:
        raise FileFormatError(f"cannot load {what} {p}: the file is empty or truncated") from None
    except (RuntimeError, ValueError, OSError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, UnicodeDecodeError, MemoryError) as exc:
        raise FileFormatError(f"cannot load {what} {p}: corrupted or not a torch file ({_first_line(exc)})") from None
    _require_keys(obj, required_keys, f"{what} {p}", "a dict")
    return obj


def read_json_file(path: str | os.PathLike, what: str = "file", *,
                   required_keys: tuple[str, ...] | None = None) -> object:
    """Read a JSON file; with ``required_keys``, it must be an object holding those keys.

    Raises:
        FileNotFoundError: the file does not exist.
        FileFormatError: not UTF-8, not JSON, not an object, or without a required key (one line, naming the path).
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    try:
        obj = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileFormatError(f"cannot read {what} {p}: not valid JSON ({_first_line(exc)})") from None
    _require_keys(obj, required_keys, f"{what} {p}", "a JSON object")
    return obj


# State dicts read from a file (a checkpoint, the shipped weights): the checks every loader shares.


def check_tensor_dict(what: str, value: object, *, finite: bool = True) -> dict[str, Tensor]:
    """A dict of name -> tensor (a state dict); with ``finite``, floating tensors hold no NaN or Inf."""
    if not isinstance(value, dict):
        raise FileFormatError(f"{what} must be a dict of tensors (a state dict), got {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise FileFormatError(f"{what} must map names to tensors, got {k!r}: {type(v).__name__}")
        if finite and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise FileFormatError(f"{what} holds non-finite values in {k!r}")
    return value


def check_tensors_match(what: str, saved: Mapping[str, Tensor], mine: Mapping[str, Tensor], hint: str = "") -> None:
    """The saved state dict has exactly this run's entries with the same shapes (a ValueError naming the first
    difference otherwise; ``hint`` says what usually causes it)."""
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    tail = f" ({hint})" if hint else ""
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"has unknown {', '.join(map(repr, extra[:3]))}{' ...' if len(extra) > 3 else ''}")
        raise ValueError(f"{what} does not match this run's: it {' and '.join(parts)}{tail}")
    for k, t in mine.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            raise ValueError(f"{what} does not match this run's: {k!r} has shape {tuple(saved[k].shape)} in the "
                             f"file, {tuple(t.shape)} here{tail}")
