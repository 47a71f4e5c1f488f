"""Files that ship inside the package (whymatch/models/weights/...), read through importlib.resources."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path


def shipped_path(resource: tuple[str, str]) -> Path:
    """Filesystem path of a shipped file ``(package, 'dir/name')``; where it belongs when it is missing."""
    package, name = resource
    res = resources.files(package).joinpath(*name.split("/"))
    if res.is_file():
        return Path(str(res))
    return Path(__file__).resolve().parent.joinpath(*name.split("/"))  # package 'whymatch.models'


@contextlib.contextmanager
def open_shipped(resource: tuple[str, str], what: str, script: str) -> Iterator[Path]:
    """A real path to a shipped file for the duration of the block.

    Raises:
        FileNotFoundError: the file is missing; the message names where it belongs and ``script``,
            the repository script that writes it.
    """
    package, name = resource
    res = resources.files(package).joinpath(*name.split("/"))
    if not res.is_file():
        raise FileNotFoundError(f"{what} not found at {shipped_path(resource)}; "
                                f"create them with `python {script}` from the repository root")
    with resources.as_file(res) as path:
        yield path
