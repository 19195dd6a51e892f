"""geoloc: single-image geolocalization on H3 cells."""

__version__ = "0.1.0"
