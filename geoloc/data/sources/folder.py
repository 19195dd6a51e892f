"""The `folder` source (being written in the data-layer issue)."""
