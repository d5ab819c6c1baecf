"""DCGAN training pipeline: config, data, models, training, metrics and tracking."""
