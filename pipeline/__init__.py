"""The pipeline, one sub-package per step of the data flow: data -> teacher -> cache -> student -> losses -> eval."""
