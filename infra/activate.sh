# The one step before typing `geoloc`, `prefect`, `mlflow` or `optuna-dashboard` in a new shell:
#
#   source infra/activate.sh
#
# activates the .venv that `make` built and points the `prefect` CLI at the local stack that
# `make up` runs (PREFECT_API_URL, the port from GEOLOC_PREFECT_PORT as in infra/stack.sh).
# Nothing is written: a developer's own Prefect profile is never touched.
_geoloc_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
if [ -f "$_geoloc_root/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$_geoloc_root/.venv/bin/activate"
else
  echo "geoloc: no $_geoloc_root/.venv yet (run 'make demo' or 'make venv' first)" >&2
fi
eval "$(bash "$_geoloc_root/infra/stack.sh" env)"
unset _geoloc_root
