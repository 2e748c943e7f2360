"""segbatch: semantic segmentation of very large image collections on Ray Data."""

__version__ = "0.1.0"
