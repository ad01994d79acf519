"""World 2 terrain: heights on known slopes and kerbs, the ego's pitch and roll, boxes standing on the ground,
LiDAR ground returns on the height field, and a sloped dataroot that the devkit's transforms keep consistent."""

from __future__ import annotations

import numpy as np
import pytest

from distillbev.pipeline.data.loading import lidar_returns
from distillbev.pipeline.geometry.transforms import quaternion_to_matrix, transform_points
from distillbev.pipeline.synthetic.ego_path import EgoPath
from distillbev.pipeline.synthetic.frames import SensorSettings, ego_height, ego_pose, global_from_ego, simulate_lidar
from distillbev.pipeline.synthetic.lidar import LidarPattern
from distillbev.pipeline.synthetic.rig import LIDAR_CHANNEL, rig_variant
from distillbev.pipeline.synthetic.terrain import KERB_FACE, TRACK, WHEELBASE, Terrain
from distillbev.pipeline.synthetic.world import Scene, SceneObject

ROAD = (-4.35, 7.85)  # the kerbs' lateral offsets in world 2 (layout.ROAD_EDGES)
STRAIGHT = EgoPath((0.0, 0.0), 0.0, 5.0, 0.0)  # along +x from the origin: lateral offset = y


def plane(grade_x: float, grade_y: float, kerb: float = 0.12, path: EgoPath = STRAIGHT) -> Terrain:
    """A terrain whose smooth part is the plane z = grade_x x + grade_y y to 1e-7 over a few hundred metres: a
    plane wave of wavelength 6000 km and amplitude grade / k along each axis (sin(kx) = kx (1 - (kx)^2 / 6); the
    terrain's sines are exact to about 6e-8 relative)."""
    k = 1e-6
    waves = np.array([[k, 0.0, 0.0, grade_x / k], [0.0, k, 0.0, grade_y / k]])
    return Terrain(waves, path, ROAD, kerb)


def test_heights_on_a_known_slope_and_kerb():
    terrain = plane(0.05, 0.0)
    # on the road (lateral 0 and 3 m): 5% of x; on the left sidewalk (lateral 9 m) 12 cm higher; the right kerb
    # is at lateral -4.35 m
    assert terrain.height(np.array([0.0, 20.0, 20.0, -10.0]), np.array([0.0, 3.0, 9.0, -4.3])) == pytest.approx(
        [0.0, 1.0, 1.12, -0.5], abs=1e-6)
    assert terrain.height(np.array([-10.0]), np.array([-4.4]))[0] == pytest.approx(-0.5 + 0.12, abs=1e-6)
    gx, gy = terrain.gradient(np.array([30.0]), np.array([2.0]))
    assert (gx[0], gy[0]) == pytest.approx((0.05, 0.0), abs=1e-7)
    # a single wave: H = a sin(k x) with a k = 0.05 (a 5% grade at x = 0, level at a quarter wavelength)
    k = 2 * np.pi / 200.0
    wave = Terrain(np.array([[k, 0.0, 0.0, 0.05 / k]]), STRAIGHT, ROAD, 0.1)
    assert wave.height(np.array([50.0]), np.array([0.0]))[0] == pytest.approx(0.05 / k, abs=1e-9)
    assert wave.max_slope == pytest.approx(0.05)


def test_drawn_terrain_is_gentle_and_deterministic():
    a = Terrain.draw(np.random.default_rng(4), STRAIGHT, ROAD)
    b = Terrain.draw(np.random.default_rng(4), STRAIGHT, ROAD)
    assert np.array_equal(a.waves, b.waves) and a.kerb_height == b.kerb_height
    assert 0.01 < a.max_slope <= 0.06 + 1e-12 and 0.10 <= a.kerb_height <= 0.15
    wavelengths = 2 * np.pi / np.hypot(a.waves[:, 0], a.waves[:, 1])
    assert (wavelengths >= 50.0).all() and (wavelengths <= 250.0).all()


def test_ego_pitch_and_roll_follow_the_ground_under_the_wheels():
    # a 5% grade ahead: the front wheels stand 0.05 * wheelbase higher, the pitch is atan(0.05), no roll
    height, pitch, roll = plane(0.05, 0.0).ego_attitude(np.array([10.0, 0.0]), 0.0)
    assert (height, pitch, roll) == pytest.approx((0.5, np.arctan(0.05), 0.0), abs=1e-7)
    # driving down the same grade (heading pi): nose down
    assert plane(0.05, 0.0).ego_attitude(np.array([10.0, 0.0]), np.pi)[1] == pytest.approx(-np.arctan(0.05), abs=1e-7)
    # a 2% cross slope rising to the left: roll atan(0.02); with the grade too, atan(0.02 cos(pitch))
    assert plane(0.0, 0.02).ego_attitude(np.array([0.0, 0.0]), 0.0)[2] == pytest.approx(np.arctan(0.02), abs=1e-7)
    _, pitch, roll = plane(0.05, 0.02).ego_attitude(np.array([0.0, 0.0]), 0.0)
    assert roll == pytest.approx(np.arctan(0.02 * np.cos(np.arctan(0.05))), abs=1e-7)
    # the written rotation puts the ego's x and y axes in the ground plane z = 0.05 x + 0.02 y
    scene = Scene(0, 0, (0,), 0, STRAIGHT, (), world=2, terrain=plane(0.05, 0.02))
    xy, z, rotation = ego_pose(scene, 0)
    matrix = quaternion_to_matrix(rotation)
    for axis in (matrix[:, 0], matrix[:, 1]):
        assert axis[2] == pytest.approx(0.05 * axis[0] + 0.02 * axis[1], abs=1e-7)
    assert matrix[:, 0] == pytest.approx(np.array([1.0, 0.0, 0.05]) / np.sqrt(1.0025), abs=1e-7)
    assert z == pytest.approx(0.0, abs=1e-7) and (WHEELBASE, TRACK) == (2.588, 1.51)


def test_dataset_stats_reads_pitch_and_roll_back_from_the_ego_rotation():
    from distillbev.pipeline.data.stats import _pitch_roll

    scene = Scene(0, 0, (0,), 0, EgoPath((0.0, 0.0), 0.7, 5.0, 0.0), (), world=2, terrain=plane(0.05, 0.02))
    _, _, rotation = ego_pose(scene, 0)
    _, pitch, roll = scene.terrain.ego_attitude(np.array([0.0, 0.0]), 0.7)
    # nose up on the ground is a negative turn about y
    assert _pitch_roll(rotation) == pytest.approx((-pitch, roll), abs=1e-12)
    grade = 0.05 * np.cos(0.7) + 0.02 * np.sin(0.7)  # the plane's slope along the heading
    assert pitch == pytest.approx(np.arctan(grade), abs=1e-7)


def test_boxes_stand_on_the_terrain():
    car = SceneObject("car", (1.9, 4.6, 1.7), (20.0, 3.0), 0.0, (2.0, 0.0), "vehicle.moving")
    building = SceneObject("building", (10.0, 20.0, 8.0), (40.0, 15.0), 0.0, (0.0, 0.0), "", annotated=False)
    scene = Scene(0, 0, (0, 500_000), 0, STRAIGHT, (car, building), world=2, terrain=plane(0.05, 0.02))
    boxes = scene.boxes_at(500_000)  # the car has moved 1 m: at x = 21 on the road
    assert boxes[0, 2] == pytest.approx(0.05 * 21.0 + 0.02 * 3.0 + 1.7 / 2, abs=1e-6)
    # the building (unannotated clutter) stands on the lowest ground under it: its corner at x 30, y 10 is on
    # the sidewalk (lateral 10 > 7.85): 1.5 + 0.2 + 0.12
    assert boxes[1, 2] == pytest.approx(0.05 * 30.0 + 0.02 * 10.0 + 0.12 + 8.0 / 2, abs=1e-6)
    # the ego at t = 0.5 s stands at x = 2.5, 5% of it higher; an annotation is written relative to that height
    assert ego_height(scene, 500_000) == pytest.approx(0.05 * 2.5, abs=1e-7)


@pytest.mark.parametrize("curvature", [0.0, 0.015])
def test_lidar_ground_returns_lie_on_the_height_field(curvature):
    path = EgoPath((100.0, 50.0), 0.7, 6.0, curvature)
    terrain = Terrain.draw(np.random.default_rng(11), path, ROAD, max_grade=0.06)
    scene = Scene(3, 0, (0,), 0, path, (), world=2, terrain=terrain)
    for noise in (0.0, 0.02):
        settings = SensorSettings(0, 70.0, LidarPattern(), noise)
        frame = simulate_lidar(scene, 0, settings, count_points=False)
        assert len(frame.points) == 32 * 1084  # every ray has its row; those without a return sit at the origin
        frame.points = frame.points[lidar_returns(frame.points)]
        lidar_pose = global_from_ego(scene, 0) @ rig_variant(0)[LIDAR_CHANNEL].ego_from_sensor
        points = transform_points(lidar_pose, frame.points[:, :3].astype(np.float64))
        ranges = np.linalg.norm(frame.points[:, :3], axis=1)
        smooth = terrain.smooth(points[:, 0], points[:, 1])
        lateral = terrain.lateral(points[:, 0], points[:, 1])
        at_kerb = np.min(np.abs(lateral[:, None] - np.array(ROAD)[None]), axis=1) < 0.05 + 4 * noise
        # off a kerb's face a return is on the height field within the range noise (5 sigma, growing with range;
        # float32 files round to about 1e-5 m)
        error = points[:, 2] - terrain.height(points[:, 0], points[:, 1])
        tolerance = 5 * noise * (1 + ranges / 50.0) + 1e-4
        assert (np.abs(error[~at_kerb]) <= tolerance[~at_kerb]).all(), np.abs(error[~at_kerb]).max()
        # at a kerb a return is on the road, on the sidewalk or on the face between them
        step = points[at_kerb, 2] - smooth[at_kerb]
        assert ((step >= -tolerance[at_kerb]) & (step <= terrain.kerb_height + tolerance[at_kerb])).all()
        assert len(points) > 15_000 and (terrain.off_road(points[:, 0], points[:, 1])).sum() > 1000
        if noise == 0.0:
            face_hits = (step > 0.01) & (step < terrain.kerb_height - 0.01)
            assert face_hits.sum() > 5  # some beams hit the kerbs' faces


def test_a_ray_hits_the_kerb_face_where_it_crosses_the_kerb_line():
    terrain = plane(0.0, 0.0, kerb=0.15)
    # from 0.1 m above the road at lateral 7 m, level toward the left kerb (lateral 7.85): the face at 0.85 m
    ranges, kind, normals = terrain.ray_hits(np.array([0.0, 7.0, 0.1]), np.array([[0.0, 1.0, 0.0]]), 70.0)
    assert ranges[0] == pytest.approx(0.85) and kind[0] == KERB_FACE
    assert normals[0] == pytest.approx([0.0, -1.0, 0.0])
    # 0.2 m up it passes over the kerb; sloping down 10% it meets the sidewalk top 0.05 / 0.1 m past the line
    direction = np.array([0.0, 1.0, -0.1]) / np.sqrt(1.01)
    ranges, kind, _ = terrain.ray_hits(np.array([0.0, 7.0, 0.2 + 0.085]), direction[None], 70.0)
    assert ranges[0] * direction[1] == pytest.approx(0.85 + 0.5 * 0.0 + (0.285 - 0.085 - 0.15) / 0.1, abs=1e-6)


@pytest.mark.slow
def test_sloped_dataroot_boxes_and_points_agree_after_the_devkit_transforms(tmp_path):
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box
    from distillbev.pipeline.data.stats import _pitch_roll
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

    config = SyntheticConfig(num_scenes=2, samples_per_scene=2, val_scenes=1, seed=7, sweeps_per_key_frame=1,
                                    instance_masks=False)
    generate_dataset(tmp_path, config, progress=False)
    nusc = NuScenes(config.version, str(tmp_path), verbose=False)
    pitches, checked = [], 0
    for sample in nusc.sample:
        lidar_token = sample["data"]["LIDAR_TOP"]
        record = nusc.get("sample_data", lidar_token)
        ego = nusc.get("ego_pose", record["ego_pose_token"])
        assert ego["translation"][2] == 0.0
        pitches.append(abs(_pitch_roll(ego["rotation"])[0]))
        # the devkit moves every box global -> ego -> LiDAR; the points stay in the LiDAR frame
        _, boxes, _ = nusc.get_sample_data(lidar_token)
        cloud = LidarPointCloud.from_file(nusc.get_sample_data_path(lidar_token))
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert int(points_in_box(box, cloud.points[:3]).sum()) == ann["num_lidar_pts"]
            checked += 1
    assert checked > 50
    assert max(pitches) > 0.003  # the ego pitches with the ground (more than 0.3% somewhere)
