"""Command-line options shared by stages: a teacher cache's storage options, the split index's infos source."""

from __future__ import annotations

import json

import click

CACHE_HELP = ("Teacher cache: a local folder or an object-store URL (s3://bucket/prefix/cache.zarr, or any fsspec "
              "URL).")

storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Object-store setting for an s3:// (or fsspec) cache URL, e.g. endpoint_url=http://host:8333, region=..., "
         "key=..., secret=..., backend=fsspec; the AWS_* environment is used otherwise. Repeatable.")


def recorded_storage_options(options: dict[str, str]) -> list[str]:
    """`--storage-option` arguments safe to record in a store's manifest (credentials left out)."""
    secret = {"key", "secret", "token"}
    return [arg for name, value in sorted(options.items()) if name not in secret
            for arg in ("--storage-option", f"{name}={value}")]


infos_option = click.option(
    "--infos", "infos", type=click.Path(file_okay=False, exists=True), default=None, metavar="DIR",
    help="Folder of mmdet3d's nuscenes_infos_{train,val}.pkl: build the split index from them instead of the "
         "devkit tables (sets data.infos; the index is saved once and mapped by every later process).")


def infos_override(infos: str | None) -> list[str]:
    """`--infos DIR` as the `--set` override it stands for (none when not given); the path is quoted so that any
    folder name stays a string."""
    return [] if infos is None else [f"data.infos={json.dumps(str(infos))}"]
