"""The qualitative figure: GT and each run's predicted boxes on the same val samples, in BEV and on CAM_FRONT.

    figure = plot_qualitative(runs, "qualitative.png", samples=3, score_threshold=0.3)
    figure.drawn[0].bev["GT"]  # (K, 4, 2) BEV outlines of the GT boxes drawn for the first sample

Predictions are read from each run's `eval/results_nusc.json` (nuScenes results format, global frame) and moved to
the sample's key-frame LiDAR frame with the dataset's poses; GT comes from the dataset's `annotations` (the boxes the
evaluation scores). One row per sample: a BEV panel (x right, y up, metres; the key-frame LiDAR points in grey) and
the CAM_FRONT image with the 3D boxes projected through the camera's calibration and its own ego pose.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..distill.progress import snapshot_indices
from ..geometry.transforms import box_corners, invert_transform, make_transform, project_to_image, quaternion_to_matrix

log = logging.getLogger(__name__)

CAMERA = "CAM_FRONT"
GT_COLOUR = "#111111"
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
# the 12 edges of a box_corners() box: bottom face, top face, verticals
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
MIN_DEPTH = 0.1  # metres: a box with a corner closer to (or behind) the camera plane is not projected
DPI = 100
ROW_INCHES = 5.25  # qualitative.png: one row per sample, 0.75 in for the legend
FIGURE_WIDTH = 14.0


@dataclass
class DrawnSample:
    """What one row of the figure shows: BEV outlines (K, 4, 2) and projected corners (K, 8, 2), per source."""

    token: str
    bev: dict[str, np.ndarray] = field(default_factory=dict)
    camera: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class QualitativeFigure:
    path: Path
    drawn: list[DrawnSample]
    notes: list[str]


def results_to_lidar_boxes(records: list[dict], lidar_to_ego: np.ndarray, ego_to_global: np.ndarray,
                           score_threshold: float) -> np.ndarray:
    """nuScenes result records (global frame) with detection_score >= score_threshold -> boxes (K, 7) x, y, z, l,
    w, h, yaw in the key-frame LiDAR frame (the inverse of results.boxes_to_global_records)."""
    kept = [r for r in records if float(r["detection_score"]) >= score_threshold]
    if not kept:
        return np.zeros((0, 7))
    lidar_from_global = invert_transform(lidar_to_ego) @ invert_transform(ego_to_global)
    rotation = lidar_from_global[:3, :3]
    centres = np.array([r["translation"] for r in kept], dtype=np.float64) @ rotation.T + lidar_from_global[:3, 3]
    headings = np.stack([quaternion_to_matrix(r["rotation"])[:, 0] for r in kept]) @ rotation.T  # (K, 3)
    sizes = np.array([r["size"] for r in kept], dtype=np.float64)  # [w, l, h]
    yaws = np.arctan2(headings[:, 1], headings[:, 0])
    return np.column_stack([centres, sizes[:, 1], sizes[:, 0], sizes[:, 2], yaws])


def bev_outlines(boxes: np.ndarray) -> np.ndarray:
    """(K, 4, 2) BEV rectangles of boxes (K, >=7), counter-clockwise from the front-left corner (+l/2, +w/2)."""
    if len(boxes) == 0:
        return np.zeros((0, 4, 2))
    return box_corners(np.asarray(boxes)[:, :7])[:, :4, :2]


def project_boxes(boxes: np.ndarray, camera_from_lidar: np.ndarray, intrinsic: np.ndarray,
                  image_size: tuple[int, int]) -> np.ndarray:
    """Pixel corners (K', 8, 2) of the boxes (K, >=7, LiDAR frame) that lie in front of the camera with at least one
    corner inside the image (W, H); corner order as box_corners."""
    if len(boxes) == 0:
        return np.zeros((0, 8, 2))
    corners = box_corners(np.asarray(boxes)[:, :7])  # (K, 8, 3)
    camera_points = corners.reshape(-1, 3) @ camera_from_lidar[:3, :3].T + camera_from_lidar[:3, 3]
    pixels, depth = project_to_image(camera_points, intrinsic)
    pixels, depth = pixels.reshape(-1, 8, 2), depth.reshape(-1, 8)
    width, height = image_size
    inside = (pixels[..., 0] >= 0) & (pixels[..., 0] < width) & (pixels[..., 1] >= 0) & (pixels[..., 1] < height)
    keep = (depth > MIN_DEPTH).all(axis=1) & inside.any(axis=1)
    return pixels[keep]


@dataclass
class CameraView:
    """One sample's CAM_FRONT image (H, W, 3) uint8 and the map from the key-frame LiDAR frame into its camera."""

    image: np.ndarray
    camera_from_lidar: np.ndarray
    intrinsic: np.ndarray


def load_camera_view(nusc, token: str, lidar_to_ego: np.ndarray, ego_to_global: np.ndarray) -> CameraView:
    """The sample's CAM_FRONT record, image and calibration (camera pose at the camera's own timestamp)."""
    from PIL import Image

    sample = nusc.get("sample", token)
    if CAMERA not in sample["data"]:
        raise KeyError(f"sample {token} has no {CAMERA} sample_data")
    record = nusc.get("sample_data", sample["data"][CAMERA])
    calibration = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", record["ego_pose_token"])
    camera_to_global = make_transform(pose["rotation"], pose["translation"]) \
        @ make_transform(calibration["rotation"], calibration["translation"])
    with Image.open(Path(nusc.dataroot) / record["filename"]) as image:
        pixels = np.asarray(image.convert("RGB"))
    return CameraView(pixels, invert_transform(camera_to_global) @ ego_to_global @ lidar_to_ego,
                      np.asarray(calibration["camera_intrinsic"], dtype=np.float64))


def key_frame_points(nusc, token: str) -> np.ndarray:
    """(P, 3) key-frame LIDAR_TOP points in the LiDAR frame (the .pcd.bin's x, y, z)."""
    record = nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"])
    return np.fromfile(Path(nusc.dataroot) / record["filename"], dtype=np.float32).reshape(-1, 5)[:, :3]


def read_run_results(run) -> tuple[dict | None, str | None]:
    """(results by sample token, None) of a run's eval/results_nusc.json, or (None, what is missing)."""
    path = run.path / "eval" / "results_nusc.json"
    if not path.is_file():
        return None, (f"{run.name}: no eval/results_nusc.json (train-student writes it after the last epoch; "
                      f"finish or --resume the run)")
    return json.loads(path.read_text())["results"], None


def plot_qualitative(runs: list, out: Path, dataset, nusc, samples: int, score_threshold: float,
                     extent: tuple[float, float, float, float]) -> QualitativeFigure:
    """Draw `samples` val samples (evenly spaced over the split) of `dataset`, GT and every run's boxes with
    score >= score_threshold; `nusc` (pipeline.data.loading.load_nuscenes) gives the camera records and points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D


    notes: list[str] = []
    results = {}
    for run in runs:
        results[run.name], problem = read_run_results(run)
        if problem:
            notes.append(problem)
            log.warning("%s", problem)
    indices = snapshot_indices(len(dataset), samples)
    colours = {run.name: RUN_COLOURS[i % len(RUN_COLOURS)] for i, run in enumerate(runs)}
    fig, axes = plt.subplots(len(indices), 2, figsize=(FIGURE_WIDTH, ROW_INCHES * len(indices) + 0.75),
                             squeeze=False, constrained_layout=True, gridspec_kw={"width_ratios": [1.0, 16 / 9]})
    drawn: list[DrawnSample] = []
    for row, index in enumerate(indices):
        token = dataset.sample_tokens[index]
        lidar_to_ego, ego_to_global = dataset.poses(index)
        gt_boxes = dataset.annotations(index)[0][:, :7]
        boxes = {"GT": gt_boxes}
        for run in runs:
            if results[run.name] is not None:
                boxes[run.name] = results_to_lidar_boxes(results[run.name].get(token, []), lidar_to_ego,
                                                         ego_to_global, score_threshold)
        sample = DrawnSample(token)
        bev_ax, camera_ax = axes[row]
        points = key_frame_points(nusc, token)
        points = points[::max(1, len(points) // 30000)]
        bev_ax.scatter(points[:, 0], points[:, 1], s=0.5, c="#a0a0a0", linewidths=0, rasterized=True)
        bev_ax.plot([0], [0], marker="o", color="#444444", markersize=5)  # the LiDAR
        for name, source_boxes in boxes.items():
            colour, width = (GT_COLOUR, 2.0) if name == "GT" else (colours[name], 1.2)
            sample.bev[name] = bev_outlines(source_boxes)
            for outline, box in zip(sample.bev[name], source_boxes):
                bev_ax.fill(outline[:, 0], outline[:, 1], fill=False, edgecolor=colour, linewidth=width)
                front = outline[[0, 3]].mean(axis=0)  # the heading: centre to the front edge
                bev_ax.plot([box[0], front[0]], [box[1], front[1]], color=colour, linewidth=width)
        bev_ax.set_xlim(extent[0], extent[1])
        bev_ax.set_ylim(extent[2], extent[3])
        bev_ax.set_aspect("equal")
        bev_ax.set_xlabel("x (m)", fontsize=8)
        bev_ax.set_ylabel("y (m)", fontsize=8)
        bev_ax.tick_params(labelsize=7)
        counts = ", ".join(f"{name} {len(b)}" for name, b in boxes.items())
        bev_ax.set_title(f"sample {token[:10]}: BEV, LiDAR frame ({counts})", fontsize=9)
        try:
            view = load_camera_view(nusc, token, lidar_to_ego, ego_to_global)
        except (KeyError, OSError) as exc:
            message = f"sample {token}: no {CAMERA} image ({exc}); the BEV panel is drawn alone"
            notes.append(message)
            log.warning("%s", message)
            camera_ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8, wrap=True,
                           transform=camera_ax.transAxes)
            camera_ax.set_axis_off()
        else:
            height, width = view.image.shape[:2]
            camera_ax.imshow(view.image, extent=(0, width, height, 0))
            for name, source_boxes in boxes.items():
                colour, line = (GT_COLOUR, 2.0) if name == "GT" else (colours[name], 1.2)
                sample.camera[name] = project_boxes(source_boxes, view.camera_from_lidar, view.intrinsic,
                                                    (width, height))
                for corners in sample.camera[name]:
                    for a, b in BOX_EDGES:
                        camera_ax.plot(corners[[a, b], 0], corners[[a, b], 1], color=colour, linewidth=line)
            camera_ax.set_xlim(0, width)
            camera_ax.set_ylim(height, 0)
            camera_ax.set_axis_off()
            counts = ", ".join(f"{name} {len(corners)}" for name, corners in sample.camera.items())
            camera_ax.set_title(f"{CAMERA}: boxes projected ({counts})", fontsize=9)
        drawn.append(sample)
    handles = [Line2D([], [], color=GT_COLOUR, linewidth=2.0, label="GT")]
    for run in runs:
        state = "" if results[run.name] is not None else " - no eval/results_nusc.json"
        handles.append(Line2D([], [], color=colours[run.name], linewidth=1.2, label=f"{run.label}{state}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False,
               title=f"GT and predictions with score >= {score_threshold:g} on {len(indices)} samples of "
                     f"{dataset.split}", title_fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return QualitativeFigure(out, drawn, notes)
