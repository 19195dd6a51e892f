"""Data layer: sources -> raw -> processed -> canonical index -> dataset."""
