"""`distillbev make-synthetic`: write the embedded synthetic nuScenes-format dataroot."""

from __future__ import annotations

import click


@click.command(name="make-synthetic")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Dataroot folder to write.")
@click.option("--scenes", type=int, default=None, help="Number of scenes (default 10; the last 2 are val).")
@click.option("--samples-per-scene", type=int, default=None, help="Key frames per scene (default 10).")
@click.option("--val-scenes", type=int, default=None, help="How many of the scenes form the val split (default 2).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0); same seed, same bytes.")
@click.option("--version", "version", type=str, default=None,
              help="Table folder name (default v1.0-synthetic). v1.0-mini writes the official mini layout: 10 "
                   "scenes under the official mini scene names, split by the devkit's own mini_train / mini_val.")
@click.option("--world", type=click.Choice(["1", "2"]), default="2", show_default=True,
              help="2: the street world (objects built from parts, materials, clutter, nuScenes range and class "
                   "frequencies); 1: one coloured box per object on a flat grid (the quick main job's world).")
@click.option("--workers", type=int, default=None,
              help="Processes generating scenes in parallel (default: one per CPU, at most one per scene); the "
                   "output is the same for any number.")
@click.option("--masks/--no-masks", "masks", default=None,
              help="Write the instance masks of a simulated segmenter beside samples/ (for MVP's virtual points, "
                   "docs/mvp.md). Default: on in world 2, off in world 1, where they add files and change no other.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty folder that holds no synthetic dataroot.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def command(out_dir: str, scenes: int | None, samples_per_scene: int | None, val_scenes: int | None,
            seed: int | None, version: str | None, world: str, workers: int | None, masks: bool | None,
            overwrite: bool, no_progress: bool) -> None:
    """Generate a synthetic nuScenes-format dataset (LiDAR, six cameras, 13 tables, custom splits)."""
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

    config = SyntheticConfig.boxes() if world == "1" else SyntheticConfig()
    if version == "v1.0-mini" and scenes is None:
        scenes = 10
    if scenes is not None:
        config.num_scenes = scenes
        # Keep a train scene when only the scene count is given.
        config.val_scenes = min(config.val_scenes, max(scenes - 1, 1))
    for field, value in (("samples_per_scene", samples_per_scene), ("val_scenes", val_scenes), ("seed", seed),
                         ("version", version)):
        if value is not None:
            setattr(config, field, value)
    if masks is not None:
        config.instance_masks = masks
    if workers is not None and workers < 1:
        raise click.BadParameter(f"must be at least 1, found {workers}", param_hint="--workers")
    summary = generate_dataset(out_dir, config, progress=not no_progress, overwrite=overwrite, workers=workers)
    click.echo(f"synthetic dataroot {summary['out_dir']} ({summary['version']}): {summary['scenes']} scenes "
               f"({summary['train_scenes']} train / {summary['val_scenes']} val), {summary['samples']} samples, "
               f"{summary['annotations']} annotations, {summary['seconds']:.1f} s, {summary['bytes']} bytes")
