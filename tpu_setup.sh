#!/usr/bin/env bash
# Cloud TPU VM lifecycle for cifar_jax: create, install, train, logs, status, stop, delete.
#
# Every worker of a pod slice runs the same main.py; JAX connects them itself
# (cifar_jax/distributed.py), on coordinator port 8476 (see README).
#
#   ./tpu_setup.sh create  --name my-tpu --zone us-central2-b --accelerator-type v4-16
#   ./tpu_setup.sh install --name my-tpu --zone us-central2-b   # Python 3.12 venv, jax[tpu]
#   ./tpu_setup.sh train   --name my-tpu --zone us-central2-b -- \
#       --config=configs/tpu.py --workdir=gs://BUCKET/runs/cifar10 --config.data_dir=gs://BUCKET/tfds
#   ./tpu_setup.sh logs    --name my-tpu --zone us-central2-b [--worker 1] [--follow]
#   ./tpu_setup.sh stop    --name my-tpu --zone us-central2-b   # SIGTERM: checkpoint, then exit
#   ./tpu_setup.sh delete  --name my-tpu --zone us-central2-b
#
# --dry-run (before or after the subcommand) prints each command, quoted so it can be
# pasted, instead of running it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tpu_setup.sh [--dry-run] COMMAND [options] [-- main.py flags]

commands:
  create    create the TPU VM (slice)
  install   copy this checkout (or --repo URL) to every worker and install it with TPU jax
            into a Python 3.12 virtual environment (~/cifar_jax_venv, made with uv)
  train     start main.py on every worker in the background; flags after -- go to main.py
  logs      show a worker's training log (--worker N, default 0; --follow to keep reading)
  status    the TPU's state, and whether main.py runs on each worker
  stop      SIGTERM main.py on every worker: it checkpoints and exits
  delete    delete the TPU VM

options (defaults in brackets; environment variables in parentheses):
  --name NAME               TPU name [cifar-jax] (TPU_NAME)
  --zone ZONE               zone [us-central2-b] (TPU_ZONE)
  --project PROJECT         GCP project [gcloud's default] (TPU_PROJECT)
  --accelerator-type TYPE   create: e.g. v4-8, v4-16, v5litepod-16 [v4-8]
  --version RUNTIME         create: TPU software version [from the accelerator type:
                            v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                            v5litepod/v5e: v2-alpha-tpuv5-lite, v2/v3/v4: tpu-ubuntu2204-base]
  --spot | --preemptible    create: spot / preemptible capacity
  --reserved                create: use reserved capacity
  --repo URL                install: git clone URL on the workers instead of copying this checkout
  --coordinator-port PORT   train: JAX coordinator port [8476]
  --tfds-data-dir DIR       train: TFDS_DATA_DIR on the workers, e.g. gs://BUCKET/tfds (TFDS_DATA_DIR)
  --log FILE                train/logs: log file on each worker, in its home [cifar_jax_train.log]
  --worker N                logs: which worker [0]
  --follow                  logs: keep printing new lines
  --dry-run                 print the commands instead of running them
EOF
}

die() {
  echo "tpu_setup.sh: $*" >&2
  exit 2
}

# --- arguments -------------------------------------------------------------------
DRY_RUN=0
COMMAND=""
NAME="${TPU_NAME:-cifar-jax}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="v4-8"
RUNTIME=""
CAPACITY=""
RESERVED=0
REPO=""
PORT="8476"
TFDS_DIR="${TFDS_DATA_DIR:-}"
LOG="cifar_jax_train.log"
WORKER="0"
FOLLOW=0
MAIN_ARGS=()
REMOTE_DIR="cifar_jax"
VENV="cifar_jax_venv"         # In each worker's home; kept across installs.
# shellcheck disable=SC2088  # The tilde is for the worker's shell to expand.
PYTHON="~/$VENV/bin/python"
HERE="$(cd "$(dirname "$0")" && pwd)"

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name) need_value "$@"; NAME="$2"; shift ;;
    --zone) need_value "$@"; ZONE="$2"; shift ;;
    --project) need_value "$@"; PROJECT="$2"; shift ;;
    --accelerator-type) need_value "$@"; ACCELERATOR="$2"; shift ;;
    --version) need_value "$@"; RUNTIME="$2"; shift ;;
    --spot) CAPACITY="--spot" ;;
    --preemptible) CAPACITY="--preemptible" ;;
    --reserved) RESERVED=1 ;;
    --repo) need_value "$@"; REPO="$2"; shift ;;
    --coordinator-port) need_value "$@"; PORT="$2"; shift ;;
    --tfds-data-dir) need_value "$@"; TFDS_DIR="$2"; shift ;;
    --log) need_value "$@"; LOG="$2"; shift ;;
    --worker) need_value "$@"; WORKER="$2"; shift ;;
    --follow) FOLLOW=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    create|install|train|logs|status|stop|delete)
      [[ -z "$COMMAND" ]] || die "two commands given: $COMMAND and $1"
      COMMAND="$1" ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage >&2; exit 2; }

# Values that end up in gcloud flags or remote shell commands must look like what they
# are; anything else (spaces, quotes, ';', '$(') is refused here, never interpreted.
check() {  # check LABEL VALUE REGEX
  [[ "$2" =~ $3 ]] || die "$1 '$2' is not valid (expected $3)"
}
check --name "$NAME" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$'
check --zone "$ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$'
[[ -z "$PROJECT" ]] || check --project "$PROJECT" '^[a-z][-a-z0-9.:]{4,61}[a-z0-9]$'
check --accelerator-type "$ACCELERATOR" '^[a-z0-9]+-[0-9]+$'
[[ -z "$RUNTIME" ]] || check --version "$RUNTIME" '^[a-zA-Z0-9._-]+$'
check --coordinator-port "$PORT" '^[0-9]{2,5}$'
check --worker "$WORKER" '^(all|[0-9]+)$'
check --log "$LOG" '^[A-Za-z0-9._-]+$'

# --- running commands --------------------------------------------------------------
quote() {  # POSIX shell quoting, one word per argument: safe inside a remote command line.
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run() {  # Runs "$@", or prints it (quoted, ready to paste) under --dry-run.
  if [[ "$DRY_RUN" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")

on_workers() {  # on_workers WORKER REMOTE_COMMAND
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

# The TPU software version Google documents for JAX on each generation (all Ubuntu 22.04).
runtime_for() {  # runtime_for ACCELERATOR_TYPE
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no TPU software version known for --accelerator-type $1; pass --version RUNTIME" ;;
  esac
}

# The worker's install, whatever Python the image has: uv (pip-installed for the user, or
# its installer) makes a Python 3.12 virtual environment, fetching a managed CPython when
# the image has none, then installs the pinned requirements, jax[tpu] and the project.
worker_install() {  # worker_install JAX_VERSION
  local uv='command -v uv >/dev/null || python3 -m pip install -q --user uv'
  uv+=' || curl -LsSf https://astral.sh/uv/install.sh | sh'
  echo "export PATH=\"\$HOME/.local/bin:\$PATH\" && { $uv; }" \
    "&& uv venv -q --allow-existing --python 3.12 ~/$VENV" \
    "&& cd $REMOTE_DIR && uv pip install -q --python $PYTHON -r requirements.txt" \
    "$(quote "jax[tpu]==$1") -e ."
}

# --- commands --------------------------------------------------------------------
case "$COMMAND" in
  create)
    [[ -n "$RUNTIME" ]] || RUNTIME=$(runtime_for "$ACCELERATOR")
    args=(create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
    [[ -z "$CAPACITY" ]] || args+=("$CAPACITY")
    [[ "$RESERVED" == 0 ]] || args+=(--reserved)
    run "${TPU[@]}" "${args[@]}"
    ;;

  install)
    # requirements.txt pins jax/jaxlib; jax[tpu] at the same version adds the matching libtpu.
    jax_version=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$HERE/requirements.txt")
    [[ -n "$jax_version" ]] || die "no jax==VERSION pin in requirements.txt"
    setup=$(worker_install "$jax_version")
    if [[ -n "$REPO" ]]; then
      check --repo "$REPO" '^(https://|git@)[A-Za-z0-9._:/@~-]+$'
      on_workers all "rm -rf $REMOTE_DIR && git clone -q $(quote "$REPO") $REMOTE_DIR && $setup"
    else
      # This checkout's committed HEAD (uncommitted edits are not shipped).
      archive="${TMPDIR:-/tmp}/cifar_jax_$NAME.tar.gz"
      run git -C "$HERE" archive --format=tar.gz -o "$archive" HEAD
      run "${TPU[@]}" scp "$archive" "$NAME:cifar_jax.tar.gz" "${WHERE[@]}" --worker=all
      on_workers all "rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf cifar_jax.tar.gz -C $REMOTE_DIR && $setup"
    fi
    ;;

  train)
    [[ ${#MAIN_ARGS[@]} -gt 0 ]] || die "train needs main.py flags after --, e.g. -- --config=configs/tpu.py --workdir=DIR"
    env_vars="JAX_COORDINATOR_PORT=$PORT"
    [[ -z "$TFDS_DIR" ]] || env_vars+=" TFDS_DATA_DIR=$(quote "$TFDS_DIR")"
    # nohup + setsid: training outlives the ssh session; each worker logs to its own file.
    on_workers all "[ -x $PYTHON ] || { echo 'no ~/$VENV on this worker: run tpu_setup.sh install first' >&2; exit 1; }; cd $REMOTE_DIR && $env_vars setsid nohup $PYTHON main.py $(quote "${MAIN_ARGS[@]}") > ~/$LOG 2>&1 < /dev/null &"
    ;;

  logs)
    if [[ "$FOLLOW" == 1 ]]; then tail="tail -n 100 -F"; else tail="tail -n 100"; fi
    on_workers "$WORKER" "$tail ~/$LOG"
    ;;

  status)
    run "${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format="value(state,health,acceleratorType)"
    on_workers all "pgrep -af '[c]ifar_jax_venv/bin/python main.py' || echo 'main.py is not running'"
    ;;

  stop)
    on_workers all "pkill -TERM -f '[c]ifar_jax_venv/bin/python main.py' || echo 'main.py was not running'"
    ;;

  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
