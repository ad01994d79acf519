"""The commands on an s3:// cache, against the loopback SeaweedFS server: the real extract-teacher stage writes the
same chunks as on a local disk, inspect-cache verifies and summarises it, and train-student trains from it with
DataLoader workers (started by forkserver: the parent has read the store before they start)."""

from __future__ import annotations

import json

import pytest
from cache_fakes import store_chunks
from test_cache_contract_cli import _student_argv, error_line, run, world  # noqa: F401 (fixture)

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.location import StoreLocation

pytestmark = pytest.mark.slow


def test_extract_verify_and_train_from_s3(world, s3_env, tmp_path, capsys):
    tiny, argv, _ = world
    url = s3_env.url("cli/cache.zarr")
    code, out, err = run([*argv, "--cache", url, "--storage-option", f"region={s3_env.env()['AWS_REGION']}"], capsys)
    assert code == 0 and f"{url}: complete: 2 sample-views" in out, err
    assert store_chunks(url) == store_chunks(tiny.cache_path)
    manifest = json.loads(StoreLocation.parse(url).get("zarr.json"))["attributes"]
    command = manifest["extraction"]["command"]
    assert f"--cache {url} --storage-option region=us-east-1" in command and "secret" not in command

    code, out, err = run(["inspect-cache", url, "--verify"], capsys)
    assert code == 0 and "verify: OK, 2 sample-views" in out, err
    code, out, _ = run(["inspect-cache", url, "--json"], capsys)
    assert code == 0 and json.loads(out)["summary"]["path"] == url
    png = tmp_path / "sample0.png"
    code, out, err = run(["inspect-cache", url, "--render", "0", "--view", "1", "--out", str(png)], capsys)
    assert code == 0 and f"wrote {png}" in out and png.stat().st_size > 10_000, err
    code, out, err = run(["inspect-cache", url, "--compare", str(tiny.cache_path), "--json"], capsys)
    compared = json.loads(out)["compare"]
    assert code == 0 and compared["sample_views"] == 2, err
    assert compared["arrays"] and all(entry["max_abs"] == 0 for entry in compared["arrays"])

    student = _student_argv(tiny, tmp_path, url)  # one DataLoader worker, batch 1
    student[student.index("--max-steps") + 1] = "2"
    code, out, err = run(student, capsys)
    assert code == 0, err[-20:]
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["kd_neck_fg"] > 0 for r in records)  # distilled from the targets read out of S3


def test_a_store_url_that_holds_no_cache_is_one_error_line(s3_env, capsys):
    url = s3_env.url("nothing-here.zarr")
    code, _, err = run(["inspect-cache", url], capsys)
    assert code == 1 and f"{url}: no teacher cache at this URL" in error_line(err)
    code, _, err = run(["inspect-cache", url, "--storage-option", "endpoint=http://x"], capsys)
    assert code == 1 and "unknown storage option(s) ['endpoint']" in error_line(err)
    assert StoreLocation.parse(url).get(v2.MARKER_FILE) is None
