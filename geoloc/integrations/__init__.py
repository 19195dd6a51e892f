"""Integrations at the edge: MLflow (tracking, registry), S3 (boto3), Optuna (sweeps).

Only these modules import mlflow, boto3 or optuna (import-linter contracts in pyproject.toml)."""
