"""files.py: output paths checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

import files
from cli import UserError


def test_writable_dir_says_a_file_is_no_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"--out-dir {blocker}: a file, not a folder"):
        files.writable_dir(blocker, "--out-dir")
    with pytest.raises(UserError, match=f"--out-dir {blocker / 'sub'}: cannot write there"):
        files.writable_dir(blocker / "sub", "--out-dir")
    assert blocker.read_text() == "x"
    assert files.writable_dir(tmp_path / "new" / "dir", "--out-dir").is_dir()


def test_an_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(ckpt)
    for out in (ckpt, tmp_path / "link.pt", tmp_path / "." / "best.pt"):
        with pytest.raises(UserError, match=f"--out {out} is the --checkpoint file") as err:
            files.check_output_file(out, "--out", {"--checkpoint": ckpt, "--scores": None})
        assert err.value.code == 2
    files.check_output_file(tmp_path / "release.pt", "--out", {"--checkpoint": ckpt})
    with pytest.raises(UserError, match=f"--out {tmp_path}: a folder, not a file"):
        files.check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match=f"--out {ckpt / 'x' / 'y.pt'}: cannot write there"):
        files.check_output_file(ckpt / "x" / "y.pt", "--out")
    files.check_output_file(tmp_path / "new" / "dir" / "release.pt", "--out")
    assert not (tmp_path / "new").exists()  # nothing created
    assert ckpt.read_bytes() == b"weights"
