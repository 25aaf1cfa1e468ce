#!/usr/bin/env bash
# Runs one jaxtune command on every host of a Cloud TPU VM slice (a multi-host pod), with gcloud.
#
#   scripts/tpu_pod.sh --name my-pod --zone us-east5-a --type v5p-32 [options] -- \
#       jaxtune train --config configs/sft_llama.py:llama3.1-8b --config.mesh.fsdp=-1 --workdir gs://BUCKET/runs/sft
#
# Steps: (1) reuse the slice NAME if it exists, else create it; (2) copy this checkout (tracked and
# untracked, not ignored files, so local configs travel too) to every worker and install it with its
# TPU and gs:// dependencies (jax[tpu], the gcs extra) into ~/jaxtune-venv (Python from uv: TPU VM images ship an older Python);
# (3) start the command on every worker at once, detached, in ~/jaxtune with its output in
# ~/jaxtune-run.log; (4) stream worker 0's log until the run ends and exit with worker 0's status;
# (5) print every worker's exit status; (6) with --delete-after, delete the slice.
# jaxtune initialises the multi-host runtime itself on a TPU VM (jax.distributed.initialize() finds
# the other hosts), so the same command runs on every worker; each reads its own data shard.
# The workdir must be one location every worker sees: a gs:// path (or a shared filesystem).
#
# Options:
#   --name NAME --zone ZONE      the slice (required)          --project P   gcloud project
#   --type TYPE                  accelerator type for creation, e.g. v5p-32, v4-32, v5litepod-16, v6e-16
#   --version V                  TPU VM runtime (default by generation; `gcloud compute tpus tpu-vm versions list`)
#   --spot                       create a spot slice
#   --reuse                      the slice must exist already (never create)
#   --skip-install               run what is installed on the workers (a rerun with unchanged code)
#   --python VERSION             Python for ~/jaxtune-venv (default 3.12)
#   --env KEY=VALUE              exported on every worker before the command (repeatable)
#   --delete-after               delete the slice when the run ends (whatever its status)
#   --logs                       only re-attach to worker 0's log of the current run
#   --stop                       send SIGTERM to the run on every worker (jaxtune checkpoints and exits)
#   --delete                     only delete the slice
#   --dry-run                    print every command instead of running it (nothing is contacted)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 REUSE=0 SKIP_INSTALL=0 PYTHON_VERSION=3.12
DELETE_AFTER=0 ACTION=run DRY_RUN=0
ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?}"; shift 2 ;;
    --zone) ZONE="${2:?}"; shift 2 ;;
    --project) PROJECT="${2:?}"; shift 2 ;;
    --type) TYPE="${2:?}"; shift 2 ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --python) PYTHON_VERSION="${2:?}"; shift 2 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env expects KEY=VALUE, got '${2:-}'"; ENVS+=("$2"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reuse) REUSE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --logs) ACTION=logs; shift ;;
    --stop) ACTION=stop; shift ;;
    --delete) ACTION=delete; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the jaxtune command goes after --; see --help)" ;;
  esac
done
COMMAND=("$@")

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
if [[ "$ACTION" == run ]]; then
  [[ ${#COMMAND[@]} -gt 0 ]] || die "no command: give it after --, e.g. -- jaxtune train --config C --workdir gs://B/run"
  [[ "$REUSE" == 1 || -n "$TYPE" ]] || die "--type is required to create the slice (or pass --reuse)"
fi

# Hosts of a slice type: v2/v3/v4/v5p names count TensorCores (2 per chip), v5e/v6e names count
# chips; multi-host slices have 4 chips per host (v5e/v6e slices up to 8 chips are one host).
hosts_of() {
  local gen="${1%-*}" n="${1##*-}" chips
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "?"; return; }
  case "$gen" in
    v2|v3|v4|v5p) chips=$((n / 2)) ;;
    v5litepod|v5e|v6e) chips=$n; if ((chips <= 8)); then echo 1; return; fi ;;
    *) echo "?"; return ;;
  esac
  echo $(((chips + 3) / 4))
}

default_version() {
  case "${1%-*}" in
    v5p) echo v2-alpha-tpuv5 ;;
    v5litepod|v5e) echo v2-alpha-tpuv5-lite ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# One shell word, single-quoted unless it needs no quoting (so printed commands can be pasted).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Prints a command (quoted, runnable as printed) and runs it unless --dry-run.
run() {
  printf '+'; for word in "$@"; do printf ' '; quote "$word"; done; printf '\n'
  [[ "$DRY_RUN" == 1 ]] || "$@"
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

LOG='$HOME/jaxtune-run.log' RC='$HOME/jaxtune-run.rc' PID='$HOME/jaxtune-run.pid'
VENV='$HOME/jaxtune-venv'

stream_worker0() {
  # tail follows the log until the run's process group leader exits; the run's status is then in RC.
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 \
    --command="tail -n +1 -F --pid=\$(cat $PID) $LOG; exit \$(cat $RC 2>/dev/null || echo 1)"
}

delete_slice() { run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

case "$ACTION" in
  delete) delete_slice; exit 0 ;;
  logs) stream_worker0; exit $? ;;
  stop) ssh_all "pkill -TERM -P \$(cat $PID)"; exit 0 ;;  # the command, not its wrapper shell (it records the status)
esac

# (1) The slice.
if [[ -n "$TYPE" ]]; then
  echo "# $NAME: $TYPE, $(hosts_of "$TYPE") host(s); every command below with --worker=all runs on each of them"
fi
CREATE=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="${VERSION:-$(default_version "$TYPE")}")
[[ "$SPOT" == 1 ]] && CREATE+=(--spot)
if [[ "$REUSE" == 1 ]]; then
  run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
elif [[ "$DRY_RUN" == 1 ]]; then
  echo "# reuse $NAME if this succeeds, else create it:"
  run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
  run "${CREATE[@]}"
elif "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "# reusing the existing slice $NAME"
else
  run "${CREATE[@]}"
fi

# (2) This checkout on every worker, installed into ~/jaxtune-venv with jax's TPU extra.
if [[ "$SKIP_INSTALL" == 0 ]]; then
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/jaxtune-src-$NAME.tar.gz"
  echo "+ git -C $(quote "$ROOT") ls-files -z --cached --others --exclude-standard | tar --null -czf $(quote "$TARBALL") -C $(quote "$ROOT") -T -"
  if [[ "$DRY_RUN" == 0 ]]; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard | tar --null -czf "$TARBALL" -C "$ROOT" -T -
  fi
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:jaxtune-src.tar.gz" "${WHERE[@]}" --worker=all
  ssh_all "set -e; rm -rf ~/jaxtune && mkdir -p ~/jaxtune && tar -xzf ~/jaxtune-src.tar.gz -C ~/jaxtune; \
export PATH=\$HOME/.local/bin:\$PATH; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
uv venv --allow-existing --python $PYTHON_VERSION $VENV; uv pip install --python $VENV/bin/python 'jax[tpu]' -e \"\$HOME/jaxtune[gcs]\""
fi

# (3) The command on every worker, detached (it survives a dropped SSH connection; --logs re-attaches).
INNER="export PATH=$VENV/bin:\$PATH"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do INNER+="; export ${kv%%=*}=$(quote "${kv#*=}")"; done
INNER+=";"; for word in "${COMMAND[@]}"; do INNER+=" $(quote "$word")"; done
INNER+="; echo \$? > $RC"
ssh_all "cd ~/jaxtune && rm -f $RC && { setsid nohup bash -c $(quote "$INNER") > $LOG 2>&1 < /dev/null & echo \$! > $PID; }"

# (4) Worker 0's log until the run ends; (5) every worker's status; (6) teardown on request.
status=0
stream_worker0 || status=$?
ssh_all "echo \"\$(hostname): exit status \$(cat $RC 2>/dev/null || echo 'unknown (still running?)')\"" || true
if [[ "$DELETE_AFTER" == 1 ]]; then
  delete_slice
fi
exit "$status"
