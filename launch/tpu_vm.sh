#!/usr/bin/env bash
# Run a crossjax experiment on a Cloud TPU VM slice, from a laptop with gcloud configured.
#
#   launch/tpu_vm.sh up        NAME ZONE ACCELERATOR        # queued resource, e.g. v5litepod-16 (waits until ACTIVE)
#   launch/tpu_vm.sh setup     NAME ZONE                    # copy this checkout to every worker, install crossjax[tpu]
#   launch/tpu_vm.sh run       NAME ZONE CONFIG WORKDIR [FLAGS...]   # start training on all workers (detached, logged)
#   launch/tpu_vm.sh babysit   NAME ZONE CONFIG WORKDIR [FLAGS...]   # poll; re-create + re-run after a preemption
#   launch/tpu_vm.sh logs      NAME ZONE [WORKER]           # tail a worker's log
#   launch/tpu_vm.sh down      NAME ZONE                    # delete the queued resource and its VMs
#
# WORKDIR is a directory every worker sees and that outlives the VMs (a gcsfuse or Filestore mount); put the
# activation store in a bucket with a flag such as --config.store.path=gs://BUCKET/store. Training resumes from the
# latest checkpoint when the same command runs again, so `babysit` only has to start it again.
set -euo pipefail

usage() { sed -n '2,12p' "$0"; exit 2; }
[ $# -ge 3 ] || usage
cmd=$1 name=$2 zone=$3; shift 3
repo_root=$(cd "$(dirname "$0")/.." && pwd)
runtime=${TPU_RUNTIME:-v2-alpha-tpuv5-lite}
remote_dir=crossjax

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

state() {
  gcloud compute tpus queued-resources describe "$name" --zone "$zone" --format='value(state.state)' 2>/dev/null || echo MISSING
}

wait_active() {
  local s
  while true; do
    s=$(state)
    echo "$(date +%T) queued resource $name: $s"
    case "$s" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED|MISSING) return 1 ;;
    esac
    sleep 60
  done
}

case "$cmd" in
  up)
    [ $# -ge 1 ] || usage
    gcloud compute tpus queued-resources create "$name" --zone "$zone" --node-id "$name" \
      --accelerator-type "$1" --runtime-version "$runtime" ${TPU_SPOT:+--spot}
    echo "$1" > "/tmp/crossjax-$name.accelerator"
    wait_active
    ;;
  setup)
    tarball=$(mktemp -t crossjax-XXXX.tar.gz)
    git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$name:~/crossjax.tar.gz" --zone "$zone" --worker=all
    on_all_workers "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf crossjax.tar.gz -C $remote_dir && \
      cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
      pip install -q -e '.[tpu,corpus]'"
    ;;
  run)
    [ $# -ge 2 ] || usage
    config=$1 workdir=$2; shift 2
    # Every worker runs the same command; jax.distributed discovers the slice's workers by itself on TPU VMs.
    on_all_workers "cd $remote_dir && . .venv/bin/activate && nohup python -m crossjax.train \
      --config=$config --workdir=$workdir --distributed $* > train.log 2>&1 &"
    ;;
  babysit)
    [ $# -ge 2 ] || usage
    accelerator=$(cat "/tmp/crossjax-$name.accelerator" 2>/dev/null || true)
    while true; do
      s=$(state)
      if [ "$s" != ACTIVE ]; then
        echo "$(date +%T) $name is $s: re-creating"
        [ -n "$accelerator" ] || { echo "unknown accelerator type: run 'up' first" >&2; exit 1; }
        gcloud compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet || true
        "$0" up "$name" "$zone" "$accelerator" && "$0" setup "$name" "$zone" && "$0" run "$name" "$zone" "$@"
      elif ! on_all_workers "pgrep -f crossjax.train >/dev/null" >/dev/null 2>&1; then
        # a finished run has a valid summary.json in its workdir (written once, by process 0)
        if gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
            --command "cd $remote_dir && . .venv/bin/activate && python -m crossjax.summary $2" >/dev/null 2>&1; then
          echo "$(date +%T) training finished"; exit 0
        fi
        echo "$(date +%T) training not running on every worker: restarting (it resumes from the last checkpoint)"
        on_all_workers "pkill -f crossjax.train || true"
        "$0" run "$name" "$zone" "$@"
      fi
      sleep 300
    done
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker="${1:-0}" --command "tail -n 50 -f $remote_dir/train.log"
    ;;
  down)
    gcloud compute tpus queued-resources delete "$name" --zone "$zone" --force --quiet
    ;;
  *) usage ;;
esac
