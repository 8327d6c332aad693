#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): create it, install, sync, run, tear down.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v4-16 --config configs/X.py \
#       [--project P] [--version RUNTIME] [--workdir DIR] [--spot] [--keep] [--dry-run] \
#       [-- extra train arguments, e.g. --config.model.base=hf:/data/Llama-2-7b-hf]
#
# Steps (each printed before it runs; --dry-run prints them all and runs nothing):
#   1. gcloud compute tpus tpu-vm create      the slice (skipped if NAME already exists)
#   2. tar of this checkout -> scp to every worker (--worker=all), unpacked in ~/longlora_jax
#   3. pip install -r requirements-tpu.txt    on every worker
#   4. python -m longlora_jax.train ...       on every worker at once (one process per host;
#      LONGLORA_DISTRIBUTED=1 makes jax.distributed find its peers from the TPU metadata);
#      every worker's output streams here, prefixed by gcloud with the worker number
#   5. gcloud compute tpus tpu-vm delete      when the run ends or fails (not with --keep)
#
# The workdir must be visible to every worker for multi-host checkpoints (a gs:// bucket
# mounted with gcsfuse, or a shared filesystem); the default is per-worker local disk, fine
# for a single-host slice such as v4-8.
set -euo pipefail

NAME="" ZONE="" ACCELERATOR="" CONFIG="" PROJECT="" WORKDIR="runs/tpu"
VERSION="tpu-ubuntu2204-base" SPOT=0 KEEP=0 DRY_RUN=0
TRAIN_ARGS=()

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for required in NAME ZONE ACCELERATOR CONFIG; do
  if [ -z "${!required}" ]; then
    flag=$(echo "$required" | tr '[:upper:]' '[:lower:]')
    echo "error: --$flag is required (see --help)" >&2
    exit 2
  fi
done
case "$ACCELERATOR" in
  v4-*|v5p-*|v5litepod-*|v6e-*) ;;
  *) echo "error: --accelerator '$ACCELERATOR' is not a TPU type like v4-8, v4-16, v5p-32" >&2
     exit 2 ;;
esac
if [ ! -f "${CONFIG%%:*}" ]; then
  echo "error: config file '${CONFIG%%:*}' does not exist" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
REMOTE_DIR="longlora_jax"
TARBALL="${TMPDIR:-/tmp}/longlora_jax-$NAME.tar.gz"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [ -n "$PROJECT" ]; then
  WHERE+=(--project="$PROJECT")
fi

# Prints a command (shell-quoted) and runs it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" = 0 ]; then
    "$@"
  fi
}

teardown() {
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

# 1. The slice.
if [ "$DRY_RUN" = 1 ] || ! "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR"
          --version="$VERSION")
  if [ "$SPOT" = 1 ]; then
    CREATE+=(--spot)
  fi
  run "${CREATE[@]}"
fi
if [ "$KEEP" = 0 ]; then
  if [ "$DRY_RUN" = 0 ]; then
    trap teardown EXIT
  fi
fi

# 2. The code: this checkout's files as git sees them (tracked, and new but not ignored).
echo "+ git ls-files --cached --others --exclude-standard -z | tar -czf $TARBALL --null -T -"
if [ "$DRY_RUN" = 0 ]; then
  git ls-files --cached --others --exclude-standard -z | tar -czf "$TARBALL" --null -T -
fi
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME":longlora_jax.tar.gz "${WHERE[@]}" --worker=all
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf longlora_jax.tar.gz -C $REMOTE_DIR"

# 3. Dependencies on every worker.
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="cd $REMOTE_DIR && python3 -m pip install --quiet -r requirements-tpu.txt"

# 4. The run, all workers at once; their output streams back here.
TRAIN=(python3 -m longlora_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")
TRAIN_LINE=$(printf ' %q' "${TRAIN[@]}")
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="cd $REMOTE_DIR && LONGLORA_DISTRIBUTED=1 HF_HUB_OFFLINE=1${TRAIN_LINE} 2>&1 | tee -a train.log"

# 5. Teardown: the EXIT trap (also on failure or Ctrl-C); printed here for --dry-run.
if [ "$DRY_RUN" = 1 ] && [ "$KEEP" = 0 ]; then
  teardown
fi
