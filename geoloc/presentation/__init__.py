"""Presentation of finished runs: plots, REPORT.md, the dashboard, the leaderboard, digest, serve.

Above inference: it reads the run folder (`geoloc.runfolder`) and never runs a model; training
and inference never import it (import-linter contract in pyproject.toml)."""
