"""Built-in trackers: MLflow, TensorBoard and W&B (offline by default)."""
