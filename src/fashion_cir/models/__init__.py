"""Backbones (dual encoders), the query composition head and the model-folder format."""
