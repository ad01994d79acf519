"""The embedded synthetic nuScenes-format dataset: `generate.generate_dataset(out_dir, SyntheticConfig(...))`."""
