"""The measured mask table of a dataroot written by `make-synthetic --world 2`.

    python -m distillbev.pipeline.mvp.mask_report --dataroot D [--json OUT]

Reads `masks_truth/` (what the error model did) and prints mask recall, label accuracy and precision by class and by
ego distance band as markdown (`masks.mask_rates`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.masks import TRUTH_FOLDER, read_truth_records
from ..errors import DataError, one_line
from ..synthetic.masks import format_mask_table, mask_rates


def mask_report(dataroot: str | Path) -> tuple[str, dict]:
    """(markdown table, rates) of a dataroot's masks; a dataroot without `masks_truth/` is a DataError."""
    records = read_truth_records(Path(dataroot))
    if not records:
        raise DataError(f"{Path(dataroot) / TRUTH_FOLDER}: no mask truth records; generate the dataroot with "
                        f"`distillbev make-synthetic --world 2` (instance masks are on in world 2)")
    rates = mask_rates(records)
    return f"{len(records)} images\n\n" + format_mask_table(rates), rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--json", default=None, help="Also write the rates to this JSON file.")
    args = parser.parse_args(argv)
    try:
        table, rates = mask_report(args.dataroot)
    except DataError as exc:
        raise SystemExit(f"error: {one_line(exc)}") from None
    print(table, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(rates, indent=1))


if __name__ == "__main__":
    main()
