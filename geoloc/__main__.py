"""`python -m geoloc ...` is the `geoloc` command (what torchrun starts: `-m geoloc train`)."""

from geoloc.cli import run

run()
