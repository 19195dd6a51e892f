#!/usr/bin/env bash
# Local Prefect stack for geoloc: one server (SQLite, analytics off, loopback only), the
# `geoloc-process` work pool, every deployment of prefect.yaml, one process worker, and
# `geoloc serve` publishing the runs folder read-only so flow-run artifacts link dashboards.
#
#   infra/stack.sh up       start what is not running, (re)deploy, wait until healthy
#   infra/stack.sh down     stop exactly the processes `up` started (pid files)
#   infra/stack.sh status   show them, and the API health
#   infra/stack.sh env      print `export PREFECT_API_URL=...` for `eval "$(infra/stack.sh env)"`
#
# Everything lives under $GEOLOC_STACK_DIR (default infra/.state/, gitignored): logs, pid files,
# and the Prefect home (database, result storage) of the stack. Settings, all optional:
#   GEOLOC_HOME          checkout the worker runs flows from (default: this repository)
#   GEOLOC_PREFECT_PORT  API/UI port on 127.0.0.1 (default 4200)
#   GEOLOC_STACK_TIMEOUT seconds to wait for the server to answer (default 180)
#   GEOLOC_DASHBOARD_PORT port of `geoloc serve` on 127.0.0.1 (default 8765); the worker gets
#       GEOLOC_DASHBOARD_URL=http://127.0.0.1:$GEOLOC_DASHBOARD_PORT unless it is set already
#   PREFECT_API_DATABASE_CONNECTION_URL  PostgreSQL instead of SQLite, e.g.
#       postgresql+asyncpg://user:pass@host:5432/prefect
#   GEOLOC_DATA_DIR, GEOLOC_RUNS_DIR, MLFLOW_TRACKING_URI are passed on to the worker as they are.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GEOLOC_HOME="${GEOLOC_HOME:-$(dirname "$here")}"
state="${GEOLOC_STACK_DIR:-$here/.state}"
port="${GEOLOC_PREFECT_PORT:-4200}"
timeout="${GEOLOC_STACK_TIMEOUT:-180}"
pool="geoloc-process"
api="http://127.0.0.1:${port}/api"
dash_port="${GEOLOC_DASHBOARD_PORT:-8765}"
export GEOLOC_DASHBOARD_URL="${GEOLOC_DASHBOARD_URL:-http://127.0.0.1:${dash_port}}"

# the stack's own Prefect home: a developer's profile (or Prefect Cloud) is never touched
export PREFECT_HOME="$state/prefect"
export PREFECT_API_URL="$api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL="$api"
export PREFECT_API_ENABLE_HTTP2=false
export PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-5}"
# the library logs through `logging.getLogger("geoloc...")`: show those lines in the UI too
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-geoloc}"
export PYTHONUNBUFFERED=1

bin="$GEOLOC_HOME/.venv/bin"
[ -x "$bin/prefect" ] || bin="$(dirname "$(command -v prefect)")"
prefect="$bin/prefect"

log() { echo "stack: $*" >&2; }

alive() { # alive NAME -> 0 when the pid file names a running process
  local f="$state/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

healthy() { curl -fsS --max-time 3 "$api/health" >/dev/null 2>&1; }

# Exec CMD in its own session (so `down` can stop its children) with SIGINT back to default:
# bash makes background jobs ignore SIGINT, and Prefect's worker answers TERM by sending itself
# INT, so an ignored INT would turn its graceful shutdown into a 15 s wait for KILL.
launch='import os, signal, sys
try:
    os.setsid()
except OSError:
    pass
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])'

start() { # start NAME CMD...: in the background, with a log and a pid file
  local name="$1"
  shift
  if alive "$name"; then
    log "$name already running (pid $(cat "$state/$name.pid"))"
    return
  fi
  "$bin/python" -c "$launch" "$@" >>"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
  log "$name started (pid $!, log $state/$name.log)"
}

stop() { # stop NAME: TERM its process group, then KILL what is left after 15 s
  local name="$1" f="$state/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "$name stopped (pid $pid)"
  fi
  rm -f "$f"
}

up() {
  mkdir -p "$state" "$PREFECT_HOME"
  if ! alive server; then
    if healthy; then
      log "port $port already serves a Prefect API that this stack did not start;" \
        "set GEOLOC_PREFECT_PORT to another port"
      exit 1
    fi
    start server "$prefect" server start --host 127.0.0.1 --port "$port"
  fi
  local waited=0
  until healthy; do
    if ! alive server; then
      log "the server exited; last lines of $state/server.log:"
      tail -n 20 "$state/server.log" >&2
      exit 1
    fi
    if [ "$waited" -ge "$timeout" ]; then
      log "no answer from $api/health after ${timeout}s (see $state/server.log)"
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  log "server healthy at $api"
  "$prefect" work-pool inspect "$pool" >/dev/null 2>&1 \
    || "$prefect" work-pool create "$pool" --type process >>"$state/deploy.log" 2>&1
  # deploy without GEOLOC_HOME so the pull step keeps `{{ $GEOLOC_HOME }}`: each worker resolves
  # it from its own environment when a flow run starts (checkouts differ between hosts)
  (cd "$GEOLOC_HOME" && env -u GEOLOC_HOME "$prefect" --no-prompt deploy --all) \
    >>"$state/deploy.log" 2>&1 || {
    log "deploy failed; last lines of $state/deploy.log:"
    tail -n 30 "$state/deploy.log" >&2
    exit 1
  }
  log "deployments registered from $GEOLOC_HOME/prefect.yaml"
  # the worker runs flows from $GEOLOC_HOME: a relative or unset runs folder lies under it
  local runs
  runs="$(cd "$GEOLOC_HOME" && mkdir -p "${GEOLOC_RUNS_DIR:-runs}" && cd "${GEOLOC_RUNS_DIR:-runs}" && pwd)"
  start dashboards "$bin/geoloc" serve --host 127.0.0.1 --port "$dash_port" --dir "$runs"
  for _ in $(seq 1 20); do
    curl -fsS --max-time 2 "http://127.0.0.1:${dash_port}/" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -fsS --max-time 2 "http://127.0.0.1:${dash_port}/" >/dev/null 2>&1 \
    || log "warning: geoloc serve does not answer on port $dash_port (see $state/dashboards.log):" \
      "dashboard links in flow runs will not open; set GEOLOC_DASHBOARD_PORT"
  start worker "$prefect" worker start --pool "$pool" --type process --name "geoloc-$(hostname)-$port"
  echo "Prefect UI: http://127.0.0.1:${port}   API: $api"
  echo "Dashboards: $GEOLOC_DASHBOARD_URL/ (runs folder $runs, read-only)"
  echo "In each new shell: source infra/activate.sh   (.venv + PREFECT_API_URL=$api)"
}

down() {
  stop worker
  stop dashboards
  stop server
}

status() {
  local name rc=0
  for name in server worker dashboards; do
    if alive "$name"; then
      echo "$name: running (pid $(cat "$state/$name.pid"), log $state/$name.log)"
    else
      echo "$name: stopped"
      rc=1
    fi
  done
  if healthy; then echo "api: healthy at $api (UI http://127.0.0.1:${port})"; else
    echo "api: no answer at $api"
    rc=1
  fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export PREFECT_API_URL=$api" ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
