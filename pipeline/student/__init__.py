"""Camera students (BEVDet, BEVDepth, BEVDet4D, BEVDepth4D) in plain torch; `model.CameraStudent` composes them."""
