"""Camera students in plain torch: `model.CameraStudent` (BEVDet, BEVDepth, BEVDet4D, BEVDepth4D) and
`bevformer.model.BEVFormerStudent`; `build.build_student` picks one from the config."""
