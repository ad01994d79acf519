"""Command-line options and their parsing shared by stages: a teacher cache's storage options, the split index's infos
source, distance bands."""

from __future__ import annotations

import json

import click

CACHE_HELP = ("Teacher cache: a local folder or an object-store URL (s3://bucket/prefix/cache.zarr, or any fsspec "
              "URL).")

storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Object-store setting for an s3:// (or fsspec) cache URL, e.g. endpoint_url=http://host:8333, region=..., "
         "key=..., secret=..., backend=fsspec; the AWS_* environment is used otherwise. Only settings (endpoint, "
         "region, backend, ...) are ever recorded, never a credential or an unknown option. Repeatable.")


def recorded_storage_options(options: dict[str, str]) -> list[str]:
    """`--storage-option` arguments that may be recorded (a store's manifest, its lock): only the settings of the
    allow-list `location.RECORDED_OPTIONS` (endpoint, region, backend, ...), URL values without user info. Every
    other option (key, secret, password, account_key, sas_token, an unknown name) is left out: the person who runs
    the recorded command gives it again."""
    from ..pipeline.cache.location import recorded_options

    return [arg for name, value in recorded_options(options).items() for arg in ("--storage-option", f"{name}={value}")]


def unrecorded_storage_options(options: dict[str, str]) -> list[str]:
    """The names of the `--storage-option`s that `recorded_storage_options` leaves out."""
    from ..pipeline.cache.location import recorded_options

    return sorted(set(options) - set(recorded_options(options)))


infos_option = click.option(
    "--infos", "infos", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
    help="Folder of mmdet3d's nuscenes_infos_{train,val}.pkl: build the split index from them instead of the "
         "devkit tables (sets data.infos; the index is saved once and mapped by every later process).")


def infos_override(infos: str | None) -> list[str]:
    """`--infos DIR` as the `--set` override it stands for (none when not given); the path is quoted so that any
    folder name stays a string."""
    return [] if infos is None else [f"data.infos={json.dumps(str(infos))}"]


def parse_distance_edges(text: str | None) -> tuple[float, ...] | None:
    """"0,20,30,40" -> (0.0, 20.0, 30.0, 40.0); None stays None. A `click.BadParameter` when not >= 0 and
    increasing."""
    if text is None:
        return None
    try:
        edges = tuple(float(value) for value in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected increasing distances in metres separated by commas, e.g. "
                                 f"0,20,30,40", param_hint="--by-distance") from None
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise click.BadParameter(f"{text!r}: the distances must be >= 0 and increasing, e.g. 0,20,30,40",
                                 param_hint="--by-distance")
    return edges
