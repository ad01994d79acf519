"""Frames and transforms: global / ego / LiDAR / camera, BEV grid index <-> metric, BEV augmentation.

Conventions (used everywhere in the project):
- A transform is a 4x4 homogeneous matrix `T_a_from_b` mapping points in frame b to frame a.
- Quaternions are (w, x, y, z), as in nuScenes.
- A box is (x, y, z, l, w, h, yaw[, vx, vy]) with (x, y, z) the gravity centre, l along the box's own x axis,
  yaw the angle of that axis counter-clockwise from the frame's +x axis, velocity in m/s in the same frame.
"""
