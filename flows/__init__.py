"""Prefect flows: thin wiring of `geoloc` library calls (see docs/ARCHITECTURE.md).

`index` (data -> canonical index), `train` (one run, then rerank evaluation and report),
`pipeline` (index -> train -> aggregate) and `aggregate` (leaderboard). Deployments of them are
declared in `prefect.yaml` at the repository root.
"""
