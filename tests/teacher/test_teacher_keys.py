"""The full teacher's state_dict has exactly mmdet3d's CenterPoint-pillar keys and shapes.

The reference is tests/teacher/data/mmdet3d_pillar_keys.json (dumped from the real mmdet3d 1.x model) when it
exists; otherwise the list written down below from mmdet3d's source (PillarFeatureNet/PFNLayer, SECOND,
SECONDFPN with use_conv_for_no_stride, CenterHead/SeparateHead with ConvModule conv+bn).
"""

from __future__ import annotations

import json
from pathlib import Path

from distillbev.pipeline.teacher.model import CenterPointTeacher

KEYS_JSON = Path(__file__).resolve().parent / "data" / "mmdet3d_pillar_keys.json"


def batch_norm(prefix: str, channels: int) -> dict[str, list[int]]:
    return {f"{prefix}.weight": [channels], f"{prefix}.bias": [channels], f"{prefix}.running_mean": [channels],
            f"{prefix}.running_var": [channels], f"{prefix}.num_batches_tracked": []}


def written_down_keys() -> dict[str, list[int]]:
    """mmdet3d `centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d`, from its source."""
    keys = {"pts_voxel_encoder.pfn_layers.0.linear.weight": [64, 11]}
    keys.update(batch_norm("pts_voxel_encoder.pfn_layers.0.norm", 64))
    stage_in, stage_out, layer_nums = [64, 64, 128], [64, 128, 256], [3, 5, 5]
    for i in range(3):
        keys[f"pts_backbone.blocks.{i}.0.weight"] = [stage_out[i], stage_in[i], 3, 3]
        keys.update(batch_norm(f"pts_backbone.blocks.{i}.1", stage_out[i]))
        for j in range(1, layer_nums[i] + 1):
            keys[f"pts_backbone.blocks.{i}.{3 * j}.weight"] = [stage_out[i], stage_out[i], 3, 3]
            keys.update(batch_norm(f"pts_backbone.blocks.{i}.{3 * j + 1}", stage_out[i]))
    keys["pts_neck.deblocks.0.0.weight"] = [128, 64, 2, 2]  # stride 0.5: Conv2d(64, 128, k=2, s=2)
    keys["pts_neck.deblocks.1.0.weight"] = [128, 128, 1, 1]  # stride 1: Conv2d(128, 128, k=1)
    keys["pts_neck.deblocks.2.0.weight"] = [256, 128, 2, 2]  # stride 2: ConvTranspose2d(256, 128, k=2, s=2)
    for i in range(3):
        keys.update(batch_norm(f"pts_neck.deblocks.{i}.1", 128))
    keys["pts_bbox_head.shared_conv.conv.weight"] = [64, 384, 3, 3]
    keys.update(batch_norm("pts_bbox_head.shared_conv.bn", 64))
    for task, num_classes in enumerate([1, 2, 2, 1, 2, 2]):
        for name, out in (("reg", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("heatmap", num_classes)):
            prefix = f"pts_bbox_head.task_heads.{task}.{name}"
            keys[f"{prefix}.0.conv.weight"] = [64, 64, 3, 3]
            keys.update(batch_norm(f"{prefix}.0.bn", 64))
            keys[f"{prefix}.1.weight"] = [out, 64, 3, 3]
            keys[f"{prefix}.1.bias"] = [out]
    return keys


def reference_keys() -> dict[str, list[int]]:
    if KEYS_JSON.is_file():
        return {k: list(v) for k, v in json.loads(KEYS_JSON.read_text()).items()}
    return written_down_keys()


def test_state_dict_matches_mmdet3d(nuscenes_experiment):
    model = CenterPointTeacher(nuscenes_experiment.model)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    reference = reference_keys()
    missing = sorted(set(reference) - set(ours))
    unexpected = sorted(set(ours) - set(reference))
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    mismatched = {k: (ours[k], reference[k]) for k in reference if ours[k] != reference[k]}
    assert not mismatched
    assert ours["pts_voxel_encoder.pfn_layers.0.linear.weight"] == [64, 11]


def test_written_down_list_agrees_with_dumped_json():
    """If the real mmdet3d dump exists, the list derived from mmdet3d's source must equal it."""
    if not KEYS_JSON.is_file():
        assert len(written_down_keys()) == 414
        return
    assert reference_keys() == written_down_keys()
