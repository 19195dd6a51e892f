-- One database per service on the shared PostgreSQL (run once by the postgres image).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
