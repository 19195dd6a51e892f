#!/usr/bin/env bash
# System packages some tests use: Debian's chromium (dashboard/MLflow UI in a real browser),
# postgresql (shared stores) and docker-compose (validates infra/docker-compose.yml).
# Installed only when missing and when we can (root + apt-get); tests that need them skip with
# a reason where they are absent.
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# compose validates infra/docker-compose.yml offline (no Docker engine needed)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
  || need+=(docker-compose)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-system: missing ${need[*]} (not root or no apt-get); tests needing them will skip" >&2
  exit 0
fi
echo "setup-system: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "setup-system: could not install ${need[*]}; tests needing them will skip" >&2
exit 0
