#!/usr/bin/env bash
# Run a training stage of the DAG (or any hicmae command) as a Ray job on an existing Ray cluster, streaming its
# log until it ends.
#
#   export RAY_ADDRESS=http://head:8265
#   scripts/ray_submit.sh [--params FILE] [--env KEY=VALUE ...] [--set KEY=VALUE ...] pretrain
#   scripts/ray_submit.sh finetune --dataset crema-d
#   scripts/ray_submit.sh predict /shared/videos --model /shared/runs/crema-d/finetune/fold-1/model \
#       --out /shared/predictions.csv          # absolute paths that every node sees
#
# RAY_ADDRESS is the cluster's dashboard (job submission) address. Every argument from the first one that is not
# --params or --env is passed to the `hicmae` command. The cluster's nodes must have the project installed with
# `hicmae` on PATH, and their environment must give HICMAE_WORKDIR (a folder all nodes share: data/, runs/,
# ray_results/) and MLFLOW_TRACKING_URI (the MLflow server), as the image and compose file in docker/ do;
# `--env KEY=VALUE` sets such a variable for this job only. The parameter file (default: this checkout's
# params.yaml) travels with the job as its working directory. Inside the job Ray sets RAY_ADDRESS to the
# cluster, so the stage joins it rather than starting a Ray of its own.
# A cluster that requires a token needs RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)
# in this environment too. Exits non-zero if the job fails; interrupting the command leaves the job running
# (`ray job logs -f ID`, `ray job stop ID`).
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray cluster dashboard address, e.g. http://head:8265}"

params="$(dirname "$0")/../params.yaml"
job_env=()
while [ $# -gt 0 ]; do
    case "$1" in
        --params) params=$2; shift 2 ;;
        --env) job_env+=("$2"); shift 2 ;;
        *) break ;;
    esac
done
[ -f "$params" ] || { echo "ray_submit.sh: parameter file $params not found" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: ray_submit.sh [--params FILE] [--env KEY=VALUE ...] [hicmae arguments]" >&2; exit 2; }

job_dir=$(mktemp -d)
trap 'rm -rf "$job_dir"' EXIT
cp "$params" "$job_dir/params.yaml"

ray job submit --address "$RAY_ADDRESS" --working-dir "$job_dir" -- \
    env "${job_env[@]}" hicmae --params params.yaml "$@"
