"""Atomic writes: a file appears whole or not at all, with the mode a plain write would give it."""

import os

import pytest

from pipeline.files import atomic_path, write_json


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_an_atomic_write_gets_the_mode_a_plain_write_gets(umask, tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    write_json(tmp_path / "atomic.json", {})
    assert os.stat(tmp_path / "atomic.json").st_mode & 0o777 == os.stat(plain).st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
