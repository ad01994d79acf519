"""Hand-computed checks of the generator's geometry: ego path, rectangle overlap, ray casting, LiDAR pattern."""

from __future__ import annotations

import numpy as np

from distillbev.pipeline.synthetic.ego_path import EgoPath, rectangle_corners, rectangles_overlap
from distillbev.pipeline.synthetic.lidar import LidarPattern, cast_lidar
from distillbev.pipeline.synthetic.raycast import FACE_BACK, FACE_FRONT, FACE_LEFT, FACE_TOP, box_hits, ground_hits
from distillbev.pipeline.synthetic.tables import make_token, visibility_token


def test_straight_path():
    path = EgoPath((10.0, 20.0), np.pi / 2, 5.0, 0.0)
    xy, heading = path.pose(np.array([0.0, 2.0]))
    np.testing.assert_allclose(xy, [[10.0, 20.0], [10.0, 30.0]], atol=1e-12)
    np.testing.assert_allclose(heading, [np.pi / 2, np.pi / 2])


def test_curved_path_is_a_circle_arc():
    # Radius 50 m, heading 0 at the origin: the centre is (0, 50); a quarter circle ends at (50, 50) facing +y.
    path = EgoPath((0.0, 0.0), 0.0, 5.0, 1.0 / 50.0)
    quarter = (np.pi / 2 * 50.0) / 5.0
    xy, heading = path.pose(np.array([quarter / 2, quarter]))
    np.testing.assert_allclose(xy[1], [50.0, 50.0], atol=1e-9)
    np.testing.assert_allclose(np.hypot(xy[0, 0], xy[0, 1] - 50.0), 50.0, atol=1e-9)
    np.testing.assert_allclose(heading, [np.pi / 4, np.pi / 2])


def test_rectangles_overlap_separating_axis():
    square = rectangle_corners(np.array([0.0, 0.0]), np.array(2.0), np.array(2.0), np.array(0.0))
    moved = lambda x, yaw: rectangle_corners(np.array([x, 0.0]), np.array(2.0), np.array(2.0), np.array(yaw))
    assert rectangles_overlap(square, moved(1.9, 0.0))
    assert not rectangles_overlap(square, moved(2.1, 0.0))
    # A square rotated by 45 degrees reaches sqrt(2) from its centre: touches at 1 + sqrt(2) = 2.414.
    assert rectangles_overlap(square, moved(2.4, np.pi / 4))
    assert not rectangles_overlap(square, moved(2.43, np.pi / 4))
    batch = rectangles_overlap(square[None], np.stack([moved(1.0, 0.0), moved(5.0, 0.0)]))
    assert batch.tolist() == [True, False]


def test_box_hits_entry_range_and_face():
    box = np.array([10.0, 0.0, 1.0, 4.0, 2.0, 2.0, 0.0])  # x from 8 to 12, y -1..1, z 0..2
    origin = np.array([0.0, 0.0, 1.0])
    directions = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ranges, faces = box_hits(origin, directions, box)
    assert ranges[0] == 8.0 and faces[0] == FACE_BACK  # entering the box's -x face
    assert np.isinf(ranges[1:]).all()
    rotated = box.copy()
    rotated[6] = np.pi  # same solid, heading towards the origin: the face we see is now its front
    ranges, faces = box_hits(origin, directions[:1], rotated)
    assert ranges[0] == 8.0 and faces[0] == FACE_FRONT
    down = np.array([[0.0, 0.0, -1.0]])
    ranges, faces = box_hits(np.array([10.0, 0.0, 5.0]), down, box)
    assert ranges[0] == 3.0 and faces[0] == FACE_TOP
    ranges, faces = box_hits(np.array([10.0, 5.0, 1.0]), np.array([[0.0, -1.0, 0.0]]), box)
    assert ranges[0] == 4.0 and faces[0] == FACE_LEFT


def test_ground_hits():
    directions = np.array([[0.6, 0.0, -0.8], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    ranges = ground_hits(np.array([0.0, 0.0, 2.0]), directions)
    assert ranges[0] == 2.5 and np.isinf(ranges[1:]).all()


def test_lidar_pattern_and_occlusion():
    pattern = LidarPattern(num_azimuths=360)
    dirs = pattern.directions()
    assert dirs.shape == (32 * 360, 3)
    elevation = np.rad2deg(np.arcsin(dirs[::360, 2]))
    np.testing.assert_allclose(elevation[[0, -1]], [-30.67, 10.67])
    # LiDAR 2 m above the ground, identity rotation; a near box hides a far one straight ahead.
    pose = np.eye(4)
    pose[2, 3] = 2.0
    near = [5.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0]
    far = [10.0, 0.0, 1.5, 1.0, 4.0, 3.0, 0.0]
    rng = np.random.default_rng(0)
    points = cast_lidar(pose, np.array([near, far]), np.array([50.0, 100.0]), pattern, 30.0, rng, range_noise=0.0)
    assert points.dtype == np.float32 and points.shape[1] == 5
    # Below the near box's top (z < -0.06 in the LiDAR frame) and above the ground, straight ahead.
    ahead = points[(np.abs(points[:, 1]) < 0.2) & (points[:, 0] > 1.0) & (points[:, 2] > -1.9) & (points[:, 2] < -0.06)]
    assert len(ahead) > 0
    np.testing.assert_allclose(ahead[:, 0], 4.55, atol=1e-4)  # the near solid's face (inset by 5 cm)
    beside = points[(np.abs(points[:, 1]) > 1.0) & (points[:, 2] > -1.9) & (np.abs(points[:, 0] - 9.55) < 1e-3)]
    assert len(beside) > 0  # the far box is hit where the near one does not hide it
    # The sensor sees the near box's back face (its +x points away): intensity 50 x 0.5 x U(0.8, 1.2).
    assert set(np.unique(points[(np.abs(points[:, 0] - 4.55) < 1e-3), 3])) <= set(np.arange(20.0, 31.0))
    assert np.all(np.linalg.norm(points[:, :3], axis=1) <= 30.0 + 1e-4)
    # Turned to face the sensor, the same box returns its front face: 50 x 2.0 x U(0.8, 1.2).
    facing = cast_lidar(pose, np.array([near[:6] + [np.pi]]), np.array([50.0]), pattern, 30.0,
                        np.random.default_rng(0), range_noise=0.0)
    front = facing[np.abs(facing[:, 0] - 4.55) < 1e-3, 3]
    assert len(front) > 0 and set(np.unique(front)) <= set(np.arange(80.0, 121.0))


def test_tokens_and_visibility_levels():
    assert make_token(0, "scene", 1) == make_token(0, "scene", 1) != make_token(1, "scene", 1)
    assert len(make_token(0, "x")) == 32
    assert [visibility_token(f) for f in (0.0, 0.39, 0.4, 0.79, 0.8, 1.0)] == ["1", "1", "2", "3", "4", "4"]
