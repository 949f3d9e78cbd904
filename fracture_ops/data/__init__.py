"""Data plane: reading images, data sources -> manifest, synthetic data, validation, de-id, split."""
