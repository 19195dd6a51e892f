"""Modeling layer: backbones, heads, losses and how model outputs become class scores."""
