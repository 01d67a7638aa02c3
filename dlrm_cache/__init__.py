"""dlrm_cache: DLRM training with a frequency-aware software cache for huge embedding tables."""

__version__ = "0.1.0"
