"""The pipeline: stage entry points (the `hicmae` command), their configuration, training, tracking and reports."""
