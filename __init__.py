"""distillbev: DistillBEV cross-modal distillation as a two-stage pipeline with a zarr teacher-feature cache."""

__version__ = "0.1.0"
