"""Command-line options shared by the stages that read or write a teacher cache."""

from __future__ import annotations

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
