"""MVP (multimodal virtual points, Yin et al. 2021): 2D instance masks lifted to 3D virtual points beside the
LiDAR sweeps, in MVP's released layout, for the MVP teacher (docs/mvp.md)."""
