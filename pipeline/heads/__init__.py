"""Detection heads shared by the LiDAR teacher and the camera students (CenterHead)."""
