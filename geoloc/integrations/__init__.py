"""Integrations at the edge: MLflow (tracking, registry) and Optuna (sweeps).

Only these modules and `geoloc.storage` (boto3) import mlflow, boto3 or optuna (import-linter
contracts in pyproject.toml); they take locks and hashes from the foundation, never from `data/`."""
