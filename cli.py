"""The `distillbev` command line: one sub-command per pipeline stage.

Stage modules keep heavy imports (torch, zarr, the devkit) inside their command bodies so `--help` is instant.
A `DistillBEVError` is printed as one `error:` line with exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from .pipeline.errors import DistillBEVError, one_line
from .pipeline.runtime import tune_allocator

# command name -> (module under distillbev.stages, attribute): an explicit table, no registry.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-synthetic": ("make_synthetic", "command"),
    "dataset-stats": ("dataset_stats", "command"),
    "train-teacher": ("train_teacher", "command"),
    "extract-teacher": ("extract_teacher", "command"),
    "pretrain-backbone": ("pretrain_backbone", "command"),
    "train-student": ("train_student", "command"),
    "evaluate": ("evaluate", "command"),
    "evaluate-teacher": ("evaluate_teacher", "command"),
    "inspect-cache": ("inspect_cache", "command"),
    "figures": ("figures", "command"),
    "demo": ("demo", "command"),
    "ablate": ("ablate", "command"),
    "make-virtual-points": ("make_virtual_points", "command"),
}


class StageGroup(click.Group):
    """Lists every stage that is installed; resolves a command by importing its stage module."""

    def _load(self, name: str) -> click.Command | None:
        module_name, attribute = COMMANDS[name]
        try:
            module = importlib.import_module(f"{__package__}.stages.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.stages.{module_name}":
                return None
            raise
        return getattr(module, attribute)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name) if name in COMMANDS else None


@click.group(cls=StageGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="distillbev")
def cli(verbose: bool) -> None:
    """distillbev: cross-modal BEV distillation (DistillBEV) with an offline zarr teacher-feature cache.

    \b
    Pipeline:  make-synthetic -> train-teacher -> extract-teacher -> train-student -> evaluate
    Inspect:   inspect-cache STORE [--verify | --stats | --render SAMPLE | --compare STORE2]
    Teacher:   evaluate-teacher --checkpoint PTH  (ours or an mmdet3d file; docs/teacher_checkpoints.md)
    Figures:   figures --out DIR RUN [RUN ...]  (training curves, attention maps, qualitative boxes)
    All at once on the embedded synthetic dataset:  distillbev demo --out DIR
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> None:
    tune_allocator()  # pipeline/runtime.py: freed activations stay in the process between training steps
    try:
        cli.main(args=argv, prog_name="distillbev", standalone_mode=False)
    except DistillBEVError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
