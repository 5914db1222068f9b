"""Writing a file so that a failure never leaves it half-written: the data goes to a temporary file beside it,
renamed over it only once complete (os.replace is atomic on one file system)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """with replacing(path) as tmp: write tmp -- then tmp replaces path; if the block raises, path is left as it
    was (the file already there intact, or still absent) and tmp is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
