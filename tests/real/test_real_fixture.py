"""The vendored key frame is complete, unmodified (git blob ids of the source commit, listed in NOTICE.md) and
tracked by git (not hidden by .gitignore)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import pytest
from real_keyframe import CAMERA_FILES, DATAROOT, INFOS, LIDAR_FILE

NOTICE = DATAROOT / "NOTICE.md"


def notice_rows() -> dict[str, tuple[int, str]]:
    """{file here: (bytes, git blob id)} from the NOTICE.md table."""
    rows = {}
    for line in NOTICE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([^`]+)` \|.*\| ([\d,]+) \| `([0-9a-f]{40})` \|$", line)
        if match:
            rows[match.group(1)] = (int(match.group(2).replace(",", "")), match.group(3))
    return rows


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: sha1 of b"blob <size>\\0" + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_the_dataroot_holds_the_eight_files_in_the_nuscenes_layout():
    expected = {LIDAR_FILE.relative_to(DATAROOT).as_posix(), INFOS.name,
                *(f"samples/{channel}/{name}" for channel, name in CAMERA_FILES.items())}
    found = {p.relative_to(DATAROOT).as_posix() for p in DATAROOT.rglob("*") if p.is_file()} - {"NOTICE.md"}
    assert found == expected
    assert set(notice_rows()) == expected


def test_every_file_is_the_unmodified_source_file():
    rows = notice_rows()
    total = 0
    for relative, (size, blob) in rows.items():
        data = (DATAROOT / relative).read_bytes()
        assert len(data) == size, relative
        assert git_blob_id(data) == blob, relative
        total += size
    assert total == 1_622_221  # about 1.6 MB, as NOTICE.md says


def test_git_does_not_ignore_the_fixture():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=DATAROOT, capture_output=True, text=True)
    if inside.returncode != 0:
        pytest.skip("not a git checkout (an installed copy of the tests)")
    files = [str(p) for p in DATAROOT.rglob("*") if p.is_file()]
    result = subprocess.run(["git", "check-ignore", *files], cwd=DATAROOT, capture_output=True, text=True)
    assert result.returncode == 1, f"ignored by .gitignore: {result.stdout}"  # 1: none of them is ignored
