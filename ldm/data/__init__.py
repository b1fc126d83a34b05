"""Procedural datasets made on the fly (nothing is downloaded)."""
from ldm.data.shapes import (BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapeScene, ShapesDataset,
                             caption_for, render_scene)

__all__ = ["BACKGROUNDS", "COLORS", "POSITIONS", "SHAPES", "SIZES", "ShapeScene", "ShapesDataset",
           "caption_for", "render_scene"]
