#!/usr/bin/env bash
# The worker side of launch/tpu_vm.sh: it runs on every TPU VM worker, shipped there with the checkout and called
# over `gcloud compute tpus tpu-vm ssh --worker=...`. Every subcommand is safe to run again.
#
#   tpu_worker.sh setup INCOMING EXTRAS [HOOK]   put the shipped checkout INCOMING at ~/crossjax, run HOOK, make
#                                                ~/crossjax-venv (Python 3.11 by uv) and install crossjax[EXTRAS]
#                                                into it unless that exact install is there already
#   tpu_worker.sh start CONFIG WORKDIR [FLAGS...]  (re)start training detached; output appends to ~/crossjax-run/train.log
#   tpu_worker.sh state                          print "crossjax-worker HOST: running" or "... HOST: stopped (...)"
#   tpu_worker.sh stop                           stop this worker's training, if any
#   tpu_worker.sh finished WORKDIR               exit 0 when WORKDIR holds a finished run (python -m crossjax.summary)

set -euo pipefail

checkout=$HOME/crossjax
venv=$HOME/crossjax-venv
uv=$HOME/.local/bin/uv
python_version=3.11      # pyproject.toml's requires-python; TPU VM images ship an older python3
run_dir=$HOME/crossjax-run
pid_file=$run_dir/train.pid
exit_file=$run_dir/train.exit
log=$run_dir/train.log
self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

say() { echo "crossjax.launch[$(hostname)]: $*" >&2; }
die() { say "error: $*"; exit 2; }

training_pid() {  # the pid of this worker's training (its process group), when it runs
  local pid
  [ -s "$pid_file" ] || return 1
  pid=$(cat "$pid_file")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_uv() {
  [ -x "$uv" ] && return 0
  say "installing uv (it provides Python $python_version)"
  # --break-system-packages only where pip refuses user installs on a distribution-managed Python (PEP 668)
  python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv ||
    true
  [ -x "$uv" ] || die "could not install uv with 'python3 -m pip install --user uv' (the error is above): install it at $uv (docs.astral.sh/uv), then run setup again"
}

install_crossjax() {
  local extras=$1 stamp
  [ -x "$venv/bin/python" ] || "$uv" venv --quiet --seed --python "$python_version" "$venv"
  # the same pyproject.toml and extras as the last finished install: nothing to do
  stamp="$(sha256sum "$checkout/pyproject.toml" | cut -d' ' -f1) [$extras]"
  if [ "$(cat "$venv/.crossjax-install" 2>/dev/null || true)" = "$stamp" ]; then
    say "crossjax[$extras] is installed already"
    return 0
  fi
  say "installing crossjax[$extras] into $venv"
  "$uv" pip install --quiet --python "$venv/bin/python" -e "${checkout}[$extras]"
  echo "$stamp" > "$venv/.crossjax-install"   # written last: an interrupted install is redone
}

setup() {
  local incoming extras=$2 hook=${3:-} pid
  incoming=$(cd "$1" && pwd)
  if pid=$(training_pid); then
    die "training runs on this worker (pid $pid): stop it first (launch/tpu_vm.sh stop), then run setup again"
  fi
  # the new checkout replaces the old one whole; the venv outside it survives (an editable install of this path)
  rm -rf "$checkout.old"
  if [ -e "$checkout" ]; then mv "$checkout" "$checkout.old"; fi
  mv "$incoming" "$checkout"
  rm -rf "$checkout.old"
  if [ -n "$hook" ] && ! bash -c "$hook"; then
    die "CROSSJAX_TPU_SETUP_HOOK failed on this worker: $hook
It runs on every worker at every setup, so it must be safe to repeat (e.g. 'mountpoint -q /mnt/shared || sudo mount ...'); fix it and run setup again"
  fi
  install_uv
  install_crossjax "$extras"
}

stop() {
  local pid _
  pid=$(training_pid) || return 0
  say "stopping training (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do   # a minute
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  say "training (pid $pid) did not stop within a minute of SIGTERM: killing it"
  kill -KILL -- "-$pid" 2>/dev/null || true
}

start() {
  local config=$1 workdir=$2 _
  shift 2
  [ -x "$venv/bin/python" ] || die "crossjax is not installed on this worker: run launch/tpu_vm.sh setup first"
  stop   # the same command again restarts the training, never runs a second one
  mkdir -p "$run_dir"
  rm -f "$pid_file" "$exit_file"
  echo "=== $(date -u +%FT%TZ) $(hostname): python -m crossjax.train --config=$config --workdir=$workdir" \
    "--distributed $*" >> "$log"
  # setsid: a process group of its own, so that stop ends python and its children; nohup and the redirections:
  # it outlives the ssh session that started it (nothing else may hold that session's output open)
  (
    cd "$checkout" || exit
    setsid nohup bash "$self" _train --config="$config" --workdir="$workdir" --distributed "$@" \
      >> "$log" 2>&1 < /dev/null &
  )
  for _ in $(seq 1 100); do   # ten seconds
    [ -s "$pid_file" ] && return 0
    sleep 0.1
  done
  die "training did not start: see $log"
}

train() {  # runs detached under setsid: record this process (the group leader), run, record the exit status
  local status=0
  echo "$$" > "$pid_file"
  "$venv/bin/python" -m crossjax.train "$@" || status=$?
  echo "$status" > "$exit_file"
  echo "=== $(date -u +%FT%TZ) $(hostname): exit status $status" >> "$log"
}

state() {
  local me
  me="crossjax-worker $(hostname)"
  if training_pid > /dev/null; then
    echo "$me: running"
  elif [ -s "$exit_file" ]; then
    echo "$me: stopped (exit status $(cat "$exit_file"))"
  elif [ -s "$pid_file" ]; then
    echo "$me: stopped (killed)"
  else
    echo "$me: stopped (not started)"
  fi
}

finished() {
  [ -x "$venv/bin/python" ] || die "crossjax is not installed on this worker: run launch/tpu_vm.sh setup first"
  cd "$checkout"
  exec "$venv/bin/python" -m crossjax.summary "$1"
}

[ $# -ge 1 ] || die "usage: tpu_worker.sh setup|start|state|stop|finished ... (launch/tpu_vm.sh calls it)"
command=$1
shift
case "$command" in
  setup)
    [ $# -ge 2 ] || die "usage: tpu_worker.sh setup INCOMING EXTRAS [HOOK]"
    setup "$@" ;;
  start)
    [ $# -ge 2 ] || die "usage: tpu_worker.sh start CONFIG WORKDIR [FLAGS...]"
    start "$@" ;;
  _train) train "$@" ;;
  state) state ;;
  stop) stop ;;
  finished)
    [ $# -eq 1 ] || die "usage: tpu_worker.sh finished WORKDIR"
    finished "$1" ;;
  *) die "unknown subcommand $command: setup, start, state, stop or finished" ;;
esac
