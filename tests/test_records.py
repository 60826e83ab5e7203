"""Records and saved folders are written atomically and get the usual file modes."""

import os
import stat

import pytest

from edgellm.records import write_folder, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_written_record_is_readable_by_others_like_any_file(tmp_path, umask_022):
    path = write_json({"ppl": 1.0}, tmp_path / "r.json")
    assert _mode(path) == 0o644          # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_written_folder_gets_the_usual_mode_and_nothing_half_written_stays(tmp_path, umask_022):
    with write_folder(tmp_path / "model") as tmp:
        (tmp / "w.safetensors").write_bytes(b"x")
    assert _mode(tmp_path / "model") == 0o755   # not mkdtemp's 0700
    with pytest.raises(RuntimeError), write_folder(tmp_path / "broken") as tmp:
        (tmp / "w.safetensors").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
