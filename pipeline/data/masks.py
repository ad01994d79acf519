"""The instance-mask file layout of a dataroot: the masks MVP's virtual points are made from, and the truth records
the synthetic generator writes beside them (docs/mvp.md).

    masks/CAM_X/<image stem>.png        8-bit instance ids (0 = no instance), the camera's full resolution
    masks/CAM_X/<image stem>.json       {"image", "width", "height", "instances": [{"id", "label", "score"}, ...]}
    masks_truth/CAM_X/<image stem>.json what each mask really covers (synthetic dataroots only)
"""

from __future__ import annotations

import json
from pathlib import Path

MASK_FOLDER = "masks"
TRUTH_FOLDER = "masks_truth"


def mask_paths(dataroot: Path, image_filename: str) -> tuple[Path, Path]:
    """(PNG, JSON) mask files of a camera image `samples|sweeps/CAM_X/<stem>.jpg` (relative to the dataroot)."""
    parts = Path(image_filename)
    stem = parts.name.rsplit(".", 1)[0]
    folder = Path(dataroot) / MASK_FOLDER / parts.parent.name
    return folder / f"{stem}.png", folder / f"{stem}.json"


def read_truth_records(dataroot: Path) -> list[dict]:
    """Every image's truth record under `masks_truth/` of a dataroot, in file order."""
    return [json.loads(p.read_text()) for p in sorted((Path(dataroot) / TRUTH_FOLDER).glob("CAM_*/*.json"))]
