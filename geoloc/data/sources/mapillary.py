"""The `mapillary` source (being written in the data-layer issue)."""
