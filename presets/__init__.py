"""Data only: run presets, the model and dataset catalogs, and small offline dataset samples."""
