"""uniter_fast.files.replacing: a file is replaced whole or not at all."""
from __future__ import annotations

import pytest

from uniter_fast.files import replacing


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with replacing(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_bytes(b"new")
        assert path.read_bytes() == b"old"  # untouched until the block ends
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.parametrize("existed", [True, False])
def test_a_failed_write_leaves_the_file_as_it_was(tmp_path, existed):
    path = tmp_path / "out.bin"
    if existed:
        path.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == (["out.bin"] if existed else [])
    if existed:
        assert path.read_bytes() == b"old"
