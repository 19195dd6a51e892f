"""Prefect flows: thin wiring of `geoloc` library calls (see docs/ARCHITECTURE.md).

`index` (data -> canonical index), `index-sharded` (many source shards in parallel on Dask,
then one index), `train` (one run, then rerank evaluation and report), `pipeline` (index ->
train -> aggregate; `python -m flows.pipeline` is `make demo`), `aggregate` (leaderboard) and
`sweep` (Optuna trials as `train` subflows). Deployments are declared in `prefect.yaml` at the
repository root.
"""

from flows._logging import mask_secrets, send_geoloc_logs_to_prefect

send_geoloc_logs_to_prefect()
mask_secrets()
