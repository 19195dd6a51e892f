#!/usr/bin/env bash
# Flat vs factorised head at r7 on the synthetic world (issue 15, "a short r7 run"); figures in
# docs/quality.md. Not part of `make bench`: ~30 minutes on the shared 2-core machine.
# Usage: benchmarks/r7_heads_run.sh [N_IMAGES] [EPOCHS]   (scratch tree: $R7_BENCH, /tmp/r7bench)
set -euo pipefail
N=${1:-100000}
EPOCHS=${2:-2}
ROOT=${R7_BENCH:-/tmp/r7bench}
GEOLOC=${GEOLOC:-.venv/bin/geoloc}
export GEOLOC_DATA_DIR=$ROOT/data GEOLOC_RUNS_DIR=$ROOT/runs
mkdir -p "$ROOT"

# osv5m layout: it carries sequence ids, so the split keeps each capture sequence in one split
if [ -z "${SKIP_DATA:-}" ]; then  # SKIP_DATA=1: train on the index already under $ROOT
"$GEOLOC" data synth --n "$N" --size 32 --layout osv5m --workers 2
"$GEOLOC" data ingest "$GEOLOC_DATA_DIR/raw/synth" --workers 2 --set max_side=32
"$GEOLOC" index build --set resolution=7 --set parent_resolution=6 --set split=sequence \
    --set min_images_per_class=3 --set max_side=32
fi

# Same budget and loss (sparse GeoSoft) for both heads; only the head differs.
COMMON=(--config r7 --set arch=multiscale_cnn --set width=16 --set embed_dim=128
    --set image_size=32 --set "epochs=$EPOCHS" --set batch_size=256 --set num_workers=0
    --set warmup_epochs=0 --set lr=0.003 --set loss=geosoft_sparse
    --set rerank.enabled=false --set tracking.enabled=false)
run() {  # name, extra sets...
    local name=$1
    shift
    OMP_NUM_THREADS=1 /usr/bin/time -v "$GEOLOC" train "${COMMON[@]}" --set "name=$name" "$@" \
        >"$ROOT/$name.log" 2>&1
}
run r7-flat --set head=flat --set hierarchy=false &
run r7-factorised --set head=factorised --set hierarchy=true --set hier_topk_parents=5 &
wait
tail -n 3 "$ROOT"/r7-*.log
