"""Writer -> reader round trips: fp16 bit-exact, int8 within one quantisation step, manifest and head intact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from cache_fakes import LAYERS, FakeTeacher, head_state, load_points, make_manifest, run_extract, token_of

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.extract import spatial_attention
from distillbev.pipeline.heads.center_head import clip_sigmoid
from distillbev.pipeline.cache.manifest import view_augmentations, ViewConfig
from distillbev.pipeline.cache.quantize import dequantize_per_channel, quantize_per_channel
from distillbev.pipeline.cache.reader import TeacherCache


def expected_outputs(teacher: FakeTeacher, sample_index: int, view: int, views: ViewConfig):
    augmentation = view_augmentations(views, sample_index)[view]
    with torch.no_grad():
        return teacher([load_points(sample_index, augmentation)[1]]), augmentation


def test_fp16_round_trip_is_bit_exact(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    report = run_extract(path, manifest, threads_per_worker=1)
    assert report.status == "complete" and report.written == 15
    cache = TeacherCache.open(path)
    teacher = FakeTeacher()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the extraction computed with one thread: same summation order
    try:
        for sample_index, view in [(0, 0), (2, 1), (4, 2)]:
            views = ViewConfig.from_json(manifest["views"])
            outputs, augmentation = expected_outputs(teacher, sample_index, view, views)
            targets = cache.read(sample_index, view)
            assert targets.sample_token == token_of(sample_index)
            assert targets.bev_aug == augmentation
            for layer in LAYERS:
                want = outputs.features[layer][0].half().float()
                assert torch.equal(targets.features[layer], want), layer
                attention = spatial_attention(outputs.features[layer])[0]
                assert torch.equal(targets.attention[layer], attention)
                assert targets.attention[layer].mean().item() == pytest.approx(1.0, abs=1e-5)
            assert torch.equal(targets.heatmap, clip_sigmoid(outputs.heatmap)[0].half().float())
            assert torch.equal(targets.occupancy, outputs.occupancy[0])
            assert targets.occupancy.dtype == torch.bool
    finally:
        torch.set_num_threads(previous)


def test_int8_round_trip_within_one_step(tmp_path, teacher):
    manifest = make_manifest(teacher, dtype="int8", views=2)
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)
    group = zarr.open_group(str(path), mode="r")
    assert group["features/neck"].dtype == np.int8
    assert group["features/neck_scale"].shape == (5, 2, 12)
    cache = TeacherCache.open(path)
    for sample_index, view in [(1, 0), (3, 1)]:
        outputs, _ = expected_outputs(teacher, sample_index, view, ViewConfig.from_json(manifest["views"]))
        targets = cache.read(sample_index, view)
        for layer in LAYERS:
            want = outputs.features[layer][0]  # (C, Y, X)
            step = (want.amax(dim=(1, 2)) - want.amin(dim=(1, 2))) / 255  # (C,)
            error = (targets.features[layer] - want).abs().amax(dim=(1, 2))
            assert torch.all(error <= step / 2 + 1e-5), layer
            assert torch.count_nonzero(want) > 0


def test_quantize_hand_computed():
    features = np.array([[[0.0, 1.0], [2.0, 5.1]], [[3.0, 3.0], [3.0, 3.0]]], dtype=np.float32)  # (2, 2, 2)
    q, scale, offset = quantize_per_channel(features)
    assert q.dtype == np.int8
    assert scale[0] == pytest.approx(5.1 / 255) and scale[1] == 1.0  # a constant channel keeps scale 1
    assert q[0, 0, 0] == -128 and q[0, 1, 1] == 127
    assert q[0, 0, 1] == round(1.0 / (5.1 / 255)) - 128  # 50 steps above the minimum
    restored = dequantize_per_channel(q, scale, offset)
    assert np.allclose(restored[1], 3.0) and np.abs(restored - features).max() <= scale[0] / 2 + 1e-6


def test_manifest_round_trip_and_schema(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)
    stored = TeacherCache.open(path).manifest
    assert v2.validate_manifest(stored) == []
    assert stored["status"] == "complete"
    assert {k: v for k, v in stored.items() if k != "status"} == {k: v for k, v in manifest.items() if k != "status"}
    assert stored["layers"]["neck"] == {"channels": 12, "shape": [8, 8], "resolution": 2.0, "stride": 2.0}
    assert stored["layers"]["backbone2"]["stride"] == 4.0
    assert json.loads(json.dumps(stored)) == stored
    group = zarr.open_group(str(path), mode="r")
    assert group["features/neck"].metadata.dimension_names == ("sample", "view", "C", "Y", "X")
    assert group["features/neck"].chunks == (1, 1, 12, 8, 8)
    codecs = [type(c).__name__ for c in group["features/neck"].metadata.codecs]
    assert codecs == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert group["occupancy"].dtype == np.bool_ and group["done"][...].any(axis=-1).all()
    # one 48-byte header + a CRC32C per array (3 features, 3 attention, heatmap, occupancy) per sample-view
    assert group["done"].chunks == (1, 1, 48 + 4 * 8) and stored["schema_version"] == 3


def test_teacher_head_and_tokens_are_stored(tmp_path, manifest):
    path = tmp_path / "cache.zarr"
    run_extract(path, manifest)
    cache = TeacherCache.open(path)
    head = cache.read_teacher_head()
    assert set(head) == set(head_state())
    for name, value in head_state().items():
        assert np.array_equal(head[name].numpy(), value)
    assert cache.sample_tokens == [token_of(i) for i in range(5)]
    assert cache.index_of("token-003") == 3
    assert cache.num_views == 3 and len(cache) == 5
