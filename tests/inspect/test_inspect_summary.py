"""inspect-cache summary: manifest fields, extraction progress, sizes, and the --json form."""

from __future__ import annotations

import hashlib

import json

import zarr
from click.testing import CliRunner
from inspect_stores import token_of, write_store

from distillbev.cli import cli
from distillbev.pipeline.cache.inspect.summary import summarize_cache


def test_summary_fields(store):
    summary = summarize_cache(store).to_json()
    assert summary["schema_version"] == 3 and summary["status"] == "complete"
    assert summary["teacher"]["checkpoint_sha256_short"] == "b" * 12
    tokens_sha = hashlib.sha256("\n".join(f"token-{i:03d}" for i in range(4)).encode()).hexdigest()
    assert summary["dataset"] == {"dataroot": "/nonexistent/dataroot", "version": "v1.0-mini", "split": "mini_val",
                                  "num_sweeps": 1, "fingerprint": "f" * 64, "point_loading": {"num_sweeps": 1},
                                  "sample_tokens_sha256": tokens_sha}
    assert summary["bev_grid"]["shape"] == [32, 32]
    assert summary["layers"]["backbone2"]["channels"] == 8 and summary["layers"]["backbone2"]["shape"] == [8, 8]
    assert summary["layers"]["neck"]["dtype"] == "float16" and summary["layers"]["neck"]["codec"] == "zstd-1+crc32c"
    assert summary["views"]["count"] == 2 and summary["views"]["seed"] == 3
    assert summary["samples"] == {"total": 4, "complete": 4, "missing": 0, "missing_tokens": [],
                                  "sample_views_done": 8, "sample_views_total": 8}
    arrays = {a["name"]: a for a in summary["arrays"]}
    neck = arrays["features/neck"]
    # raw = 4 samples x 2 views x 5 x 16 x 16 float16 values
    assert neck["raw_bytes"] == 4 * 2 * 5 * 16 * 16 * 2
    assert neck["stored_bytes"] > 0 and neck["compression_ratio"] == neck["raw_bytes"] / neck["stored_bytes"]
    assert neck["dimension_names"] == ["sample", "view", "C", "Y", "X"]
    assert "Crc32cCodec" in neck["codecs"] and "ZstdCodec" in neck["codecs"]
    assert summary["stored_bytes"] == sum(a["stored_bytes"] for a in summary["arrays"])


def test_summary_of_a_partial_store(tmp_path):
    path = tmp_path / "partial.zarr"
    write_store(path, samples=3, finalize=False)
    zarr.open_array(str(path / "done"), mode="r+")[1, 1] = 0
    summary = summarize_cache(path).to_json()
    assert summary["status"] == "writing"
    assert summary["samples"]["sample_views_done"] == 5 and summary["samples"]["complete"] == 2
    assert summary["samples"]["missing_tokens"] == [token_of(1)]
    # raw bytes only count the 5 extracted sample-views
    assert {a["name"]: a for a in summary["arrays"]}["heatmap"]["raw_bytes"] == 5 * 10 * 16 * 16 * 2


def test_cli_summary_text_and_json(store):
    text = CliRunner().invoke(cli, ["inspect-cache", str(store)])
    assert text.exit_code == 0, text.output
    for expected in ("status complete", "sha256 bbbbbbbbbbbb", "split mini_val", "backbone2      C=8", "zstd-1+crc32c",
                     "4 of 4 complete, 0 missing; sample-views 8 / 8 done", "features/neck"):
        assert expected in text.output
    result = CliRunner().invoke(cli, ["inspect-cache", str(store), "--json"])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output)
    assert parsed["summary"]["samples"]["sample_views_done"] == 8
    assert set(parsed["summary"]["layers"]) == {"backbone1", "backbone2", "neck"}


def test_cli_missing_store_is_a_cache_error(tmp_path):
    result = CliRunner().invoke(cli, ["inspect-cache", str(tmp_path / "absent.zarr")])
    assert result.exit_code == 1 and "no teacher cache at this path" in str(result.exception)
