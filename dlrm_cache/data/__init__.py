"""Data: the Criteo-format generator, preprocessing and loading."""
