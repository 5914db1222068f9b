"""Pre-training: configuration, DeepSpeed engine, task sampling and the loop."""
