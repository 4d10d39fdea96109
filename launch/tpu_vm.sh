#!/usr/bin/env bash
# Train crossjax on a Cloud TPU VM slice from any machine with gcloud configured (docs/launch.md: the recipe).
#
#   launch/tpu_vm.sh create              request the slice as a queued resource; wait until it is ACTIVE
#   launch/tpu_vm.sh setup               copy this checkout to every worker, install crossjax[tpu] (safe to repeat)
#   launch/tpu_vm.sh run [FLAGS...]      (re)start the same training command on all workers, detached and logged
#   launch/tpu_vm.sh status              the slice's state, each worker's training, whether the run is finished
#   launch/tpu_vm.sh logs [WORKER]       follow a worker's training log (worker 0 by default)
#   launch/tpu_vm.sh stop                stop the training on all workers
#   launch/tpu_vm.sh babysit [FLAGS...]  create, setup, run and watch until the run is finished, then delete; a
#                                        preempted slice is deleted, created again, set up and run again with the
#                                        same workdir, so the run resumes from its last checkpoint
#   launch/tpu_vm.sh delete              delete the queued resource and its VMs
#
# FLAGS are extra flags of python -m crossjax.train, e.g. --config.store.path=gs://BUCKET/store. Settings:
#   CROSSJAX_TPU_NAME            queued resource and TPU name, e.g. crossjax-p160m             (every command)
#   CROSSJAX_TPU_ZONE            zone, e.g. us-west4-a                                        (every command)
#   CROSSJAX_TPU_TYPE            accelerator type, e.g. v5litepod-16                          (create, babysit)
#   CROSSJAX_TPU_PROVISIONING    spot, reserved or on-demand                                  (create, babysit)
#   CROSSJAX_CONFIG              experiment in this checkout, e.g. experiments/pythia160m.py:x32 (run, babysit)
#   CROSSJAX_WORKDIR             a directory every worker sees and that outlives the VMs, e.g. /mnt/shared/p160m
#                                                                                  (run, status, babysit)
#   CROSSJAX_TPU_RUNTIME         TPU software version (default: the one for the accelerator type)
#   CROSSJAX_TPU_EXTRAS          crossjax extras to install (default: tpu,hf)
#   CROSSJAX_TPU_SETUP_HOOK      a command every worker runs at setup, e.g. mounting the workdir's file share
#   CROSSJAX_TPU_POLL_SECONDS    babysit's polling interval (default: 60)
#   CROSSJAX_TPU_MAX_RESTARTS    babysit restarts a stopped, unfinished run this often per slice (default: 3)
# The project is gcloud's (gcloud config set project PROJECT, or CLOUDSDK_CORE_PROJECT).

set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
worker_script=crossjax/launch/tpu_worker.sh   # on the workers, relative to the home directory ssh starts in

say() { echo "crossjax.launch: $(date +%T) $*" >&2; }
die() { echo "crossjax.launch: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

# ---- settings: every missing one is named at once, with an example, before anything starts ----

missing=""
need() {  # VARIABLE EXAMPLE WHAT: note VARIABLE when it is unset or empty
  if [ -z "${!1:-}" ]; then missing+="  export $1=$2    # $3"$'\n'; fi
}

check_settings() {  # the settings the subcommand $1 needs, then their values
  local what=$1
  need CROSSJAX_TPU_NAME crossjax-p160m "name of the queued resource and its TPU"
  need CROSSJAX_TPU_ZONE us-west4-a "zone with quota for the accelerator type"
  case "$what" in
    create|babysit)
      need CROSSJAX_TPU_TYPE v5litepod-16 "accelerator type of the slice"
      need CROSSJAX_TPU_PROVISIONING spot "spot, reserved or on-demand" ;;
  esac
  case "$what" in
    run|babysit)
      need CROSSJAX_CONFIG experiments/pythia160m.py:x32 "experiment file in this checkout[:variant]"
      need CROSSJAX_WORKDIR /mnt/shared/p160m "directory every worker sees that outlives the VMs" ;;
    status)
      need CROSSJAX_WORKDIR /mnt/shared/p160m "directory every worker sees that outlives the VMs" ;;
  esac
  if [ -n "$missing" ]; then
    die "launch/tpu_vm.sh $what needs settings that are not set; set them (docs/launch.md), e.g.:"$'\n'"${missing%$'\n'}"
  fi
  name=$CROSSJAX_TPU_NAME
  zone=$CROSSJAX_TPU_ZONE
  extras=${CROSSJAX_TPU_EXTRAS:-tpu,hf}
  hook=${CROSSJAX_TPU_SETUP_HOOK:-}
  poll_seconds=${CROSSJAX_TPU_POLL_SECONDS:-60}
  max_restarts=${CROSSJAX_TPU_MAX_RESTARTS:-3}
  [[ $poll_seconds =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    die "CROSSJAX_TPU_POLL_SECONDS=$poll_seconds is not a number of seconds, e.g. export CROSSJAX_TPU_POLL_SECONDS=60"
  [[ $max_restarts =~ ^[0-9]+$ ]] ||
    die "CROSSJAX_TPU_MAX_RESTARTS=$max_restarts is not a count, e.g. export CROSSJAX_TPU_MAX_RESTARTS=3"
  case "$what" in create|babysit) check_slice_settings ;; esac
  case "$what" in run|babysit) check_run_settings ;; esac
  case "$what" in
    setup|babysit) git -C "$repo" rev-parse --git-dir > /dev/null 2>&1 ||
      die "$repo is not a git checkout: setup copies the files git sees (tracked, and untracked but not ignored); clone crossjax with git" ;;
  esac
  if [ "$what" = status ]; then workdir=$CROSSJAX_WORKDIR; fi
}

check_slice_settings() {
  accelerator=$CROSSJAX_TPU_TYPE
  case "$CROSSJAX_TPU_PROVISIONING" in
    spot) provisioning_flag=--spot ;;
    reserved) provisioning_flag=--reserved ;;
    on-demand) provisioning_flag="" ;;
    *) die "CROSSJAX_TPU_PROVISIONING=$CROSSJAX_TPU_PROVISIONING is not spot, reserved or on-demand, e.g. export CROSSJAX_TPU_PROVISIONING=spot" ;;
  esac
  if [ -n "${CROSSJAX_TPU_RUNTIME:-}" ]; then
    runtime=$CROSSJAX_TPU_RUNTIME
  else
    case "$accelerator" in  # the TPU software versions of docs.cloud.google.com/tpu/docs/runtimes
      v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      v4-*|v3-*|v2-*) runtime=tpu-ubuntu2204-base ;;
      *) die "no default TPU software version for CROSSJAX_TPU_TYPE=$accelerator: set it, e.g. export CROSSJAX_TPU_RUNTIME=v2-alpha-tpuv6e" ;;
    esac
  fi
}

check_run_settings() {
  config=$CROSSJAX_CONFIG
  workdir=$CROSSJAX_WORKDIR
  [ -f "$repo/${config%%:*}" ] ||
    die "CROSSJAX_CONFIG=$config: there is no ${config%%:*} in this checkout ($repo); the workers run it from their copy of the checkout, e.g. export CROSSJAX_CONFIG=experiments/pythia160m.py:x32"
  case "$workdir" in
    /*|gs://*) ;;
    *) die "CROSSJAX_WORKDIR=$workdir is relative: it would be on each worker's own disk and lost with the VMs; give a directory every worker sees that outlives them, e.g. export CROSSJAX_WORKDIR=/mnt/shared/p160m (a file share mounted by CROSSJAX_TPU_SETUP_HOOK)" ;;
  esac
}

# ---- gcloud ----

queued() {  # VERB [FLAGS...]: gcloud compute tpus queued-resources VERB on this slice
  local verb=$1
  shift
  gcloud compute tpus queued-resources "$verb" "$name" --zone="$zone" "$@"
}

on_workers() {  # WORKERS COMMAND: run the shell command on the workers (all, or one index)
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$1" --command="$2"
}

worker() {  # SUBCOMMAND [ARGS...]: the command line that runs launch/tpu_worker.sh on a worker, every word quoted
  printf '%q ' bash "$worker_script" "$@"
}

pause() { sleep "$poll_seconds"; }

slice_state() {  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...; MISSING when there is none; UNKNOWN when gcloud fails
  local state
  if state=$(queued describe --format='value(state.state)' 2> "$tmp/describe.err"); then
    echo "${state:-UNKNOWN}"
  elif grep -q NOT_FOUND "$tmp/describe.err"; then
    echo MISSING
  else
    say "could not describe $name: $(tr '\n' ' ' < "$tmp/describe.err")" && echo UNKNOWN
  fi
}

wait_active() {  # until the slice is ACTIVE (status 0) or will not become so (status 1)
  local state
  while :; do
    state=$(slice_state)
    case "$state" in
      ACTIVE) say "$name is ACTIVE"; return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|PREEMPTED|MISSING) say "$name is $state"; return 1 ;;
      *) say "$name is $state: waiting" && pause ;;
    esac
  done
}

create_slice() {
  local state
  state=$(slice_state)
  if [ "$state" = MISSING ]; then
    say "requesting $name: $accelerator, ${CROSSJAX_TPU_PROVISIONING}, $runtime, in $zone"
    queued create --node-id="$name" --accelerator-type="$accelerator" --runtime-version="$runtime" \
      ${provisioning_flag:+"$provisioning_flag"} || { say "gcloud could not request $name (its error is above)"; return 1; }
  else
    say "queued resource $name exists already ($state)"
  fi
  wait_active
}

delete_slice() {
  local state
  state=$(slice_state)
  if [ "$state" = MISSING ]; then say "there is no queued resource $name"; return 0; fi
  say "deleting $name and its VMs"
  queued delete --force --quiet
  while [ "$(slice_state)" != MISSING ]; do pause; done
  say "$name is deleted"
}

setup_workers() {
  local files=$tmp/files tarball=$tmp/crossjax-src.tar.gz version f
  # the working tree as git sees it (uncommitted edits included, ignored files such as .venv left out)
  git -C "$repo" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [ -e "$repo/$f" ]; then printf '%s\0' "$f"; fi
  done > "$files"
  tar -czf "$tarball" -C "$repo" --null -T "$files"
  version=$(git -C "$repo" describe --always --dirty 2> /dev/null || echo "no commit yet")
  say "copying the checkout ($version, $(du -h "$tarball" | cut -f1)) to every worker of $name"
  gcloud compute tpus tpu-vm scp "$tarball" "$name:crossjax-src.tar.gz" --zone="$zone" --worker=all
  say "installing crossjax[$extras] on every worker (skipped where it is installed already)"
  on_workers all "rm -rf crossjax.incoming && mkdir crossjax.incoming && tar -xzf crossjax-src.tar.gz -C crossjax.incoming && $(
    printf '%q ' bash crossjax.incoming/launch/tpu_worker.sh setup crossjax.incoming "$extras" "$hook")"
}

stop_training() {  # on every worker where the worker script is (it is not before the first setup)
  on_workers all "if [ -f $worker_script ]; then $(worker stop); fi"
}

start_training() {  # FLAGS...
  say "starting on all workers: python -m crossjax.train --config=$config --workdir=$workdir --distributed $*"
  on_workers all "$(worker start "$config" "$workdir" "$@")"
}

training_state() {  # running (every worker that answered runs it), stopped (one or more do not), or unknown
  local answers ok=1
  answers=$(on_workers all "$(worker state)" 2> "$tmp/state.err") || ok=0
  if grep -q 'crossjax-worker [^:]*: stopped' <<< "$answers"; then
    echo stopped
  elif [ "$ok" = 1 ] && grep -q 'crossjax-worker [^:]*: running' <<< "$answers"; then
    echo running
  else
    say "could not ask every worker of $name about its training: $(tr '\n' ' ' < "$tmp/state.err")" && echo unknown
  fi
}

run_state() {  # finished, unfinished or unknown (worker 0 unreachable), by python -m crossjax.summary WORKDIR
  local answer
  if answer=$(on_workers 0 "$(worker finished "$workdir")" 2>&1); then
    say "worker 0: $(grep -o 'finished:.*' <<< "$answer" || echo "$answer")" && echo finished
  elif grep -q 'crossjax.summary: error' <<< "$answer"; then
    echo unfinished
  else
    say "could not ask worker 0 of $name whether the run is finished: $(tr '\n' ' ' <<< "$answer")" && echo unknown
  fi
}

show_log_tail() {  # WORKER
  say "the last lines of worker $1's training log:"
  on_workers "$1" "tail -n 30 crossjax-run/train.log" >&2 || true
}

setup_and_start() {  # FLAGS...: the start on a new slice, and the restart after a stop
  stop_training
  setup_workers
  start_training "$@"
}

attempt() {  # COMMAND...: run it in a subshell that stops at its first failure; its exit status in attempt_status
  # (errexit is off inside any `if`/`||` condition, so a failed step there would run on; babysit keeps watching
  # after a failed step instead of exiting, e.g. when a spot slice is preempted during setup)
  set +e
  (set -e; "$@")
  attempt_status=$?
  set -e
}

babysit() {  # FLAGS...
  local restarts=0 failures=0 state
  while :; do
    state=$(slice_state)
    attempt_status=0
    case "$state" in
      MISSING)
        attempt create_slice
        if [ "$attempt_status" = 0 ]; then
          restarts=0
          attempt setup_and_start "$@"
        fi ;;
      ACTIVE)
        case "$(training_state)" in
          running) failures=0 ;;
          stopped)
            case "$(run_state)" in
              finished)
                say "the run in $workdir is finished: deleting the slice"
                delete_slice
                return 0 ;;
              unfinished)
                if [ "$restarts" -ge "$max_restarts" ]; then
                  show_log_tail 0
                  die "training on $name stopped $((restarts + 1)) times on this slice without a preemption: read the logs (launch/tpu_vm.sh logs WORKER), fix the cause, then run launch/tpu_vm.sh babysit again (the run resumes from its last checkpoint); the slice is kept (launch/tpu_vm.sh delete deletes it)"
                fi
                restarts=$((restarts + 1))
                say "training stopped and the run is not finished: restarting it ($restarts of at most $max_restarts on this slice); it resumes from its last checkpoint"
                attempt setup_and_start "$@" ;;
            esac ;;
        esac ;;
      FAILED)
        say "$name FAILED: deleting it and requesting it again"
        attempt_status=1
        delete_slice ;;
      PREEMPTED|SUSPENDING|SUSPENDED)
        say "$name is $state: deleting it and requesting it again; the run then resumes from its last checkpoint in $workdir"
        delete_slice ;;
      *) say "$name is $state: waiting" ;;
    esac
    if [ "$attempt_status" != 0 ]; then
      failures=$((failures + 1))
      if [ "$failures" -ge 5 ]; then
        die "requesting, setting up or starting $name failed $failures times in a row (the errors are above; 'gcloud compute tpus queued-resources describe $name --zone=$zone' tells why a request FAILED): fix the cause, then run launch/tpu_vm.sh babysit again"
      fi
      say "that step failed ($failures in a row): trying again after the next poll"
    fi
    pause
  done
}

status() {
  local state
  state=$(slice_state)
  say "queued resource $name: $state"
  [ "$state" = ACTIVE ] || return 0
  on_workers all "$(worker state)" || true
  if [ "$(run_state)" = unfinished ]; then say "the run in $workdir is not finished"; fi
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  create|setup|run|status|logs|stop|babysit|delete) ;;
  *) usage ;;
esac
check_settings "$command"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "$command" in
  create) create_slice || die "$name is not ACTIVE: 'gcloud compute tpus queued-resources describe $name --zone=$zone' says why; launch/tpu_vm.sh delete, then create again" ;;
  setup) setup_workers ;;
  run) start_training "$@" && say "follow it with: launch/tpu_vm.sh logs [WORKER]" ;;
  status) status ;;
  logs) on_workers "${1:-0}" "tail -n 100 -F crossjax-run/train.log" ;;
  stop) stop_training ;;
  babysit) babysit "$@" ;;
  delete) delete_slice ;;
esac
