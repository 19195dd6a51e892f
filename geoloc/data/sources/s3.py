"""The `s3` source (being written in the data-layer issue)."""
