"""Spatial cross-attention: pillars of hand-picked BEV cells projected into a hand-made two-camera rig, the
per-camera attention averaged over the cameras a query hits, and the memory-bounded paths (query chunks,
recomputation in the backward pass) against the plain one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillbev.pipeline.geometry.bev import BEVAugmentation, BEVRange
from distillbev.pipeline.heads.detr.deformable import DeformableAttention
from distillbev.pipeline.student.bevformer.config import BEVFormerConfig, BEVFormerEncoderConfig
from distillbev.pipeline.student.bevformer.encoder import BEVFormerEncoder
from distillbev.pipeline.student.bevformer.spatial_cross_attention import (SpatialCrossAttention, pillar_points,
                                                                           project_pillars)
from distillbev.pipeline.student.view_transformer import CameraGeometry

IMAGE_SIZE = (32, 64)  # (H, W)
FOCAL = 20.0  # wide enough that a point 45 degrees off the axis is still inside the image
# 7x7 cells of 4 m: centres at -12, -8, ..., 12; anchors at z = -1.5 and 1.5
BEV = BEVRange(x_min=-14.0, x_max=14.0, y_min=-14.0, y_max=14.0, resolution=4.0, z_min=-2.0, z_max=2.0)


def camera_looking_along(yaw: float) -> torch.Tensor:
    """(4, 4) camera -> LiDAR of a level camera at the origin looking at `yaw` (camera x right, y down, z forward)."""
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    transform = np.eye(4)
    transform[:3, :3] = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
    return torch.tensor(transform, dtype=torch.float32)


def rig(bev_aug: torch.Tensor | None = None) -> CameraGeometry:
    """One sample, camera 0 looking along +x, camera 1 along +y; principal point at the image centre."""
    height, width = IMAGE_SIZE
    intrinsics = torch.tensor([[FOCAL, 0.0, (width - 1) / 2], [0.0, FOCAL, (height - 1) / 2], [0.0, 0.0, 1.0]])
    cameras = torch.stack([camera_looking_along(0.0), camera_looking_along(math.pi / 2)])
    return CameraGeometry(intrinsics=intrinsics.expand(1, 2, 3, 3), camera_to_lidar=cameras[None],
                          image_aug=torch.eye(3).expand(1, 2, 3, 3),
                          bev_aug=torch.eye(4)[None] if bev_aug is None else bev_aug[None])


def query_index(x: float, y: float) -> int:
    """Query of the cell whose centre is (x, y): row-major iy*X + ix."""
    return int((y - BEV.y_min) // BEV.resolution) * 7 + int((x - BEV.x_min) // BEV.resolution)


def test_pillar_points_sit_at_cell_centres_between_the_z_range():
    points = pillar_points(BEV, num_z_anchors=2)
    assert points.shape == (2, 49, 3)
    assert torch.allclose(points[:, query_index(12.0, 0.0)], torch.tensor([[12.0, 0.0, -1.5], [12.0, 0.0, 1.5]]))
    assert torch.allclose(points[1, query_index(-12.0, 8.0)], torch.tensor([-12.0, 8.0, 1.5]))


def test_cell_ahead_of_a_camera_lands_on_its_principal_point_column():
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    q = query_index(12.0, 0.0)
    # camera 0: depth 12, u = 31.5 (the principal point) -> (31.5 + 0.5) / 64 = 0.5;
    # v = 15.5 - 20 * z / 12: 18.0 for z = -1.5 and 13.0 for z = 1.5 -> (v + 0.5) / 32
    expected = torch.tensor([[0.5, 18.5 / 32], [0.5, 13.5 / 32]])
    assert torch.allclose(reference.locations[0, 0, q], expected, atol=1e-6)
    assert reference.hits[0, 0, q].all()
    # camera 1 looks along +y: the point is on its image plane (depth 0), so it hits nothing there
    assert not reference.hits[0, 1, q].any()


def test_cell_between_the_cameras_hits_both_and_cells_behind_hit_none():
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    both = query_index(8.0, 8.0)  # 45 degrees off both axes: u = 31.5 -+ 20 (camera 0 sees it left of centre)
    assert reference.hits[0, :, both].all()
    assert torch.allclose(reference.locations[0, 0, both, :, 0], torch.full((2,), (11.5 + 0.5) / 64))
    assert torch.allclose(reference.locations[0, 1, both, :, 0], torch.full((2,), (51.5 + 0.5) / 64))
    behind = query_index(-12.0, -12.0)
    assert not reference.hits[0, :, behind].any()
    # (12, -12) is 45 degrees right of camera 0's axis, inside its 58-degree half field of view, and behind camera 1
    right = query_index(12.0, -12.0)
    assert reference.hits[0, 0, right].all() and not reference.hits[0, 1, right].any()


def test_bev_augmentation_is_undone_before_projecting():
    # A point q in the augmented frame is the LiDAR point bev_aug^-1 q, so augmenting both the points and the
    # geometry by the same rotation and flip must give the same projection.
    augmentation = BEVAugmentation(rotation=0.7, scale=1.0, flip_x=True)
    matrix = torch.tensor(augmentation.matrix(), dtype=torch.float32)
    points = pillar_points(BEV, 2)
    plain = project_pillars(points, rig(), IMAGE_SIZE)
    augmented = project_pillars(points @ matrix[:3, :3].T, rig(matrix), IMAGE_SIZE)
    assert torch.equal(plain.hits, augmented.hits)
    assert torch.allclose(plain.locations, augmented.locations, atol=1e-5)


def test_queries_attend_only_in_the_cameras_they_hit_and_average_over_them():
    torch.manual_seed(0)
    channels = 8
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    module = SpatialCrossAttention(channels, num_heads=2, num_levels=2, num_points=4)
    with torch.no_grad():
        module.output_proj.bias.normal_()
    shapes = [(4, 8), (2, 4)]
    query = torch.randn(1, 49, channels)
    value = torch.randn(1, 2, 32 + 8, channels)  # (B, N, L, C)
    output = module(query, value, reference, shapes)
    # Brute force: every query attends in every camera, then only the hit cameras are kept and averaged.
    per_camera = torch.stack([module.attention(query, value[:, n], reference.locations[:, n], shapes)
                              for n in range(2)], dim=1)  # (B, N, Q, C)
    attends = reference.hits.any(dim=-1)  # (B, N, Q)
    assert attends[0, :, query_index(8.0, 8.0)].all() and not attends[0, :, query_index(-12.0, -12.0)].any()
    mean = (per_camera * attends[..., None]).sum(dim=1) / attends.sum(dim=1).clamp(min=1)[..., None]
    assert torch.allclose(output, module.output_proj(mean), atol=1e-5)
    # a query that hits no camera gets the projection of zero
    assert torch.allclose(output[0, query_index(-12.0, -12.0)], module.output_proj.bias)


# ---------------------------------------------------------------------------------------------------------------
# Memory-bounded SCA: query chunks and recomputation give the outputs and gradients of the plain path
# ---------------------------------------------------------------------------------------------------------------
CHUNK_SHAPES = [(4, 8), (2, 4)]  # two levels, 32 + 8 value entries per camera


def two_sample_rig() -> CameraGeometry:
    """Batch 2: the plain rig, and the rig under a rotated, flipped BEV (other queries hit the cameras)."""
    matrix = torch.tensor(BEVAugmentation(rotation=0.7, scale=1.0, flip_x=True).matrix(), dtype=torch.float32)
    plain, augmented = rig(), rig(matrix)
    return CameraGeometry(*(torch.cat([getattr(plain, name), getattr(augmented, name)])
                            for name in ("intrinsics", "camera_to_lidar", "image_aug", "bev_aug")))


def random_module(query_chunk: int, recompute: bool, channels: int = 8) -> SpatialCrossAttention:
    """An SCA whose every weight is random (at init the offsets and weights ignore the query), seeded so every
    call builds the same weights whatever the memory settings."""
    torch.manual_seed(0)
    module = SpatialCrossAttention(channels, num_heads=2, num_levels=len(CHUNK_SHAPES), num_points=4,
                                   query_chunk=query_chunk, recompute=recompute)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.3)
    return module


def run_module(module: SpatialCrossAttention, reference, channels: int = 8) -> dict[str, torch.Tensor]:
    """Forward and backward on seeded inputs; returns the output and the gradients of inputs and weights."""
    generator = torch.Generator().manual_seed(1)
    batch, cameras = reference.hits.shape[:2]
    query = torch.randn(batch, 49, channels, generator=generator, requires_grad=True)
    value = torch.randn(batch, cameras, 32 + 8, channels, generator=generator, requires_grad=True)
    cotangent = torch.randn(batch, 49, channels, generator=generator)
    output = module(query, value, reference, CHUNK_SHAPES)
    output.backward(cotangent)
    results = {"output": output.detach(), "query": query.grad, "value": value.grad}
    results.update({name: parameter.grad for name, parameter in module.named_parameters()})
    return results


def test_the_rig_leaves_a_query_count_that_the_test_chunks_do_not_divide():
    reference = project_pillars(pillar_points(BEV, 2), two_sample_rig(), IMAGE_SIZE)
    longest = int(reference.hits.any(dim=-1).sum(dim=-1).max())
    assert longest == 17  # so chunks of 4 leave a last chunk of 1 and chunks of 5 one of 2
    assert longest % 4 and longest % 5


# Gradients the chunks leave bit for bit the same: everything on the query side (the projections run on all queries
# at once, each query's samples and their location gradients are its own). The value's gradient is a sum over all
# queries' samples that chunking splits into per-chunk parts, summed in another order, and the value projection's
# weight gradient follows from it.
SUMMED_OVER_CHUNKS = {"value", "attention.value_proj.weight", "attention.value_proj.bias"}


@pytest.mark.parametrize("query_chunk, recompute", [(1, False), (4, False), (5, True), (1, True), (64, True)])
def test_chunked_and_recomputed_sampling_matches_the_plain_path(query_chunk, recompute):
    reference = project_pillars(pillar_points(BEV, 2), two_sample_rig(), IMAGE_SIZE)
    plain = run_module(random_module(0, False), reference)
    chunked = run_module(random_module(query_chunk, recompute), reference)
    assert set(chunked) == set(plain) and len(plain) == 3 + 8  # output, 2 inputs, 4 linears x (weight, bias)
    assert SUMMED_OVER_CHUNKS < set(plain)
    for name, tensor in plain.items():
        assert tensor.abs().max() > 0, name  # every input and weight takes part
        if name in SUMMED_OVER_CHUNKS:
            assert torch.allclose(chunked[name], tensor, rtol=1e-5, atol=1e-6), name
        else:
            assert torch.equal(chunked[name], tensor), name


@pytest.mark.parametrize("query_chunk", [0, 4])
def test_recomputing_changes_no_bit(query_chunk):
    # The same operations run again in the backward pass on the same inputs: identical results on the CPU.
    reference = project_pillars(pillar_points(BEV, 2), two_sample_rig(), IMAGE_SIZE)
    kept = run_module(random_module(query_chunk, False), reference)
    recomputed = run_module(random_module(query_chunk, True), reference)
    for name, tensor in kept.items():
        assert torch.equal(recomputed[name], tensor), name


@pytest.mark.parametrize("query_chunk", [1, 4])
def test_a_query_that_hits_no_camera_is_zero_before_the_output_projection(query_chunk):
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    module = random_module(query_chunk, recompute=True)
    with torch.no_grad():  # the output projection as identity: the output is the camera mean itself
        module.output_proj.weight.copy_(torch.eye(8))
        module.output_proj.bias.zero_()
    results = run_module(module, reference)
    behind = query_index(-12.0, -12.0)
    assert not reference.hits[0, :, behind].any()
    assert torch.equal(results["output"][0, behind], torch.zeros(8))
    assert torch.equal(results["query"][0, behind], torch.zeros(8))  # and nothing flows back to it
    seen = query_index(8.0, 8.0)
    assert results["output"][0, seen].abs().sum() > 0 and results["query"][0, seen].abs().sum() > 0


def test_without_gradients_recompute_is_skipped_and_the_output_is_the_same():
    reference = project_pillars(pillar_points(BEV, 2), rig(), IMAGE_SIZE)
    query = torch.randn(1, 49, 8)
    value = torch.randn(1, 2, 40, 8)
    with torch.no_grad():
        plain = random_module(0, False)(query, value, reference, CHUNK_SHAPES)
        chunked = random_module(3, True)(query, value, reference, CHUNK_SHAPES)
    assert not chunked.requires_grad
    assert torch.equal(chunked, plain)


def test_memory_settings_keep_the_parameters_and_state_dict_keys():
    plain, chunked = random_module(0, False), random_module(2, True)
    expected = {f"attention.{linear}.{kind}" for linear in ("sampling_offsets", "attention_weights", "value_proj")
                for kind in ("weight", "bias")} | {"output_proj.weight", "output_proj.bias"}
    assert set(plain.state_dict()) == set(chunked.state_dict()) == expected
    chunked.load_state_dict(plain.state_dict())  # strict: a checkpoint of either loads into the other


def test_a_negative_chunk_is_refused_with_the_config_field():
    with pytest.raises(ValueError, match="spatial_query_chunk"):
        SpatialCrossAttention(8, num_heads=2, num_levels=2, num_points=4, query_chunk=-1)


def test_deformable_attention_chunks_queries_with_the_same_outputs():
    # The shared module (DETR decoder, SCA) on its own: 7 queries in chunks of 3, with an output projection.
    torch.manual_seed(0)
    module = DeformableAttention(embed_dims=8, num_heads=2, num_levels=2, num_points=2)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(std=0.3)
    query = torch.randn(2, 7, 8, requires_grad=True)
    value = torch.randn(2, 40, 8, requires_grad=True)
    reference = torch.rand(2, 7, 1, 2)
    results = []
    for chunk, recompute in ((0, False), (3, True)):
        query.grad = value.grad = None
        module.zero_grad()
        output = module(query, value, reference, CHUNK_SHAPES, query_chunk=chunk, recompute=recompute)
        output.square().sum().backward()
        results.append([output.detach(), query.grad, value.grad, module.value_proj.weight.grad])
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])
    for plain, chunked in zip(results[0][2:], results[1][2:]):  # summed over the chunks
        assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)


def test_the_encoder_config_sets_the_layers_memory_settings():
    config = BEVFormerConfig(embed_dims=8, bev=BEV,
                             encoder=BEVFormerEncoderConfig(num_layers=2, num_heads=2, num_levels=2, spatial_points=2,
                                                            num_z_anchors=2, spatial_query_chunk=7,
                                                            spatial_recompute=False))
    encoder = BEVFormerEncoder(config, num_cameras=2)
    assert [(layer.spatial_attention.query_chunk, layer.spatial_attention.recompute)
            for layer in encoder.layers] == [(7, False), (7, False)]
    assert (BEVFormerEncoderConfig().spatial_query_chunk, BEVFormerEncoderConfig().spatial_recompute) == (2048, True)
