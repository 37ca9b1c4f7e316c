"""Model assets: the demo model forge."""
