"""CelluScan: classify single blood-cell microscope images into 14 types with a Vision Transformer."""

__version__ = "0.1.0"
