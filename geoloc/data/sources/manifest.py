"""The `manifest` source (being written in the data-layer issue)."""
