"""Atomic writes: a file appears whole or not at all, and a path that cannot be written is one clear user error that
names it, with nothing left behind."""

from __future__ import annotations

import pytest

from moss_rlhf.config import UserError
from moss_rlhf.files import atomic_write_text


def test_a_written_file_is_whole_and_leaves_no_temporary_behind(tmp_path):
    atomic_write_text(tmp_path / "deep" / "er" / "out.json", "{}\n")
    atomic_write_text(tmp_path / "deep" / "er" / "out.json", "[1]\n")  # replaced in place
    assert (tmp_path / "deep" / "er" / "out.json").read_text() == "[1]\n"
    assert [p.name for p in (tmp_path / "deep" / "er").iterdir()] == ["out.json"]


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "a_dir").mkdir() or root / "a_dir", "a_dir: is a directory; expected the path of a file"),
    (lambda root: (root / "a_file").write_text("x") and root / "a_file" / "out.json",
     "cannot write .*a_file/out.json: a parent of it is a file, not a directory"),
])
def test_a_path_that_cannot_be_written_is_a_user_error_naming_it(tmp_path, make, message):
    target = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        atomic_write_text(target, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
