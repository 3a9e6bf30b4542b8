#!/usr/bin/env bash
# Start a local Ray head the way cluster.yaml starts one (dashboard on 127.0.0.1, TRAIN_DRIVER
# slots, token authentication), submit the toy sft_adamw sweep through `ray job submit`, and
# require the job to end SUCCEEDED with a Pareto front. Usage: scripts/ray_job_submit_check.sh
# [trials] (default 2). Run by tests/test_search.py (slow) and by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath "${VENV:-.venv}")
TRIALS=${1:-2}
SWEEP=toy_sft_adamw  # the TOY sweep of sweeps/sft_adamw.py
export RAY_AUTH_MODE=token
STORAGE=$(mktemp -d)
# as cluster.yaml does: jobs inherit the tracking URI from the environment Ray was started in
export MLFLOW_TRACKING_URI="sqlite:///$STORAGE/mlflow.db"
"$VENV/bin/ray" start --head --num-cpus=2 --dashboard-host=127.0.0.1 \
  --resources='{"TRAIN_DRIVER": 2}' --disable-usage-stats > "$STORAGE/head.log" 2>&1
trap '"$VENV/bin/ray" stop --force > /dev/null 2>&1; rm -rf "$STORAGE"' EXIT
# `ray job submit` waits for the job and exits 1 if it failed (pipefail keeps that status)
"$VENV/bin/ray" job submit --address http://127.0.0.1:8265 --working-dir sweeps \
  --submission-id "raylens-check-$$" -- \
  "$VENV/bin/python" sft_adamw.py --toy --trials "$TRIALS" --storage "$STORAGE/runs" 2>&1 \
  | tee "$STORAGE/job.log"
grep -q "Job 'raylens-check-$$' succeeded" "$STORAGE/job.log"
grep -q "^| \* |" "$STORAGE/job.log"
# every trial is in MLflow: the report has the baseline row and one row per trial
"$VENV/bin/python" -m raylens.cli report "$SWEEP" --format csv > "$STORAGE/report.csv" || { cat "$STORAGE/report.csv"; exit 1; }
test "$(($(wc -l < "$STORAGE/report.csv") - 2))" -eq "$TRIALS"
echo "ray job submit: toy sweep SUCCEEDED"
