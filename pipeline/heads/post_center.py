"""Where a detection head keeps its decoded box centres: the x / y extent of its BEV grown by a margin, z in a band.

Both heads (the CenterHead and the DETR head) drop decoded boxes whose centre lies outside `post_center_range`
(x_min, y_min, z_min, x_max, y_max, z_max). A config says it once, as `post_center_margin` (metres added on every
side of the head's BEV extent; CenterPoint's and BEVFormer's nuScenes +-61.2 m around +-51.2 m is a 10 m margin).
An explicit `post_center_range` (the form every config, checkpoint and cache manifest written before the margin
existed records) is kept as given, and the margin it makes is recorded beside it, so an old record and a new one
of the same config hold the same values.
"""

from __future__ import annotations

POST_CENTER_Z: tuple[float, float] = (-10.0, 10.0)  # metres: the z band of a derived range (CenterPoint, BEVFormer)
DEFAULT_POST_CENTER_MARGIN = 10.0  # metres, when neither the range nor the margin is given


def resolve_post_center_range(given: tuple[float, ...] | None, margin: float | None,
                              extent: tuple[float, float, float, float]) -> tuple[tuple[float, ...], float | None]:
    """(post_center_range, post_center_margin) of a head over the BEV extent (x_min, x_max, y_min, y_max).

    `given` None: the extent grown by `margin` (None: DEFAULT_POST_CENTER_MARGIN), z POST_CENTER_Z; the margin is
    returned as used. `given` with `margin` None: `given` as it is, with the margin it makes around the extent (None
    when its sides differ or its z band is not POST_CENTER_Z). Both: they must agree, else a ValueError saying to
    give one of them.
    """
    if margin is not None and margin < 0:
        raise ValueError(f"post_center_margin must be at least 0 m, found {margin}")
    if given is not None and len(given) != 6:
        raise ValueError(f"post_center_range has {len(given)} values; give 6 (x_min, y_min, z_min, x_max, y_max, "
                         f"z_max), or leave it out and give post_center_margin")
    if given is not None and margin is None:
        return tuple(float(v) for v in given), _margin_of(tuple(float(v) for v in given), extent)
    used = DEFAULT_POST_CENTER_MARGIN if margin is None else float(margin)
    x_min, x_max, y_min, y_max = extent
    derived = (round(x_min - used, 9), round(y_min - used, 9), POST_CENTER_Z[0],
               round(x_max + used, 9), round(y_max + used, 9), POST_CENTER_Z[1])
    if given is not None and any(abs(a - b) > 1e-6 for a, b in zip(given, derived)):
        raise ValueError(f"post_center_range {list(given)} disagrees with post_center_margin {margin} m around the "
                         f"BEV extent x [{x_min}, {x_max}), y [{y_min}, {y_max}) (which gives {list(derived)}); give "
                         f"the range once: keep post_center_margin and remove post_center_range")
    return (derived if given is None else tuple(float(v) for v in given)), used


def _margin_of(given: tuple[float, ...], extent: tuple[float, float, float, float]) -> float | None:
    """The margin `given` makes on every side of `extent`, or None when it is not one margin with z POST_CENTER_Z."""
    x_min, x_max, y_min, y_max = extent
    sides = (x_min - given[0], y_min - given[1], given[3] - x_max, given[4] - y_max)
    if max(sides) - min(sides) > 1e-6 or min(sides) < 0 or (given[2], given[5]) != POST_CENTER_Z:
        return None
    return round(sides[0], 9)
