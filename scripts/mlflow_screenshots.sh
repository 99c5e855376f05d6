#!/usr/bin/env bash
# Screenshots of a vqtok run in the MLflow UI, as a user sees it (headless Chromium):
#   scripts/mlflow_screenshots.sh RUN_FOLDER [OUT_DIR]     # OUT_DIR default docs/images
# RUN_FOLDER is a training run (it holds mlflow_run_id and, by default, its SQLite store in
# mlflow/mlflow.db). Needs `chromium` (Debian: apt-get install chromium). The pages are
# opened in MLflow's "Model training" layout (?workflowType=machine_learning).
set -euo pipefail
run=$(cd "$1" && pwd); out=${2:-docs/images}; mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}; port=${PORT:-5079}
db="$run/mlflow/mlflow.db"; run_id=$(cat "$run/mlflow_run_id")
"$py" -m mlflow ui --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" \
  >"${TMPDIR:-/tmp}/vqtok-mlflow-ui.log" 2>&1 &
server=$!; trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 1; done
exp=$("$py" -c "from mlflow import MlflowClient; import sys
print(MlflowClient(sys.argv[1]).get_run(sys.argv[2]).info.experiment_id)" "sqlite:///$db" "$run_id")
grid=$(cd "$run/tracking/files" && ls recon/*.png | sort | tail -1)
base="http://127.0.0.1:$port/#/experiments/$exp"
q="?workflowType=machine_learning"
shot() {  # name, page
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=15000 --screenshot="$out/mlflow-$1.png" "$base/$2$q" >/dev/null 2>&1
  echo "$out/mlflow-$1.png"
}
shot run "runs/$run_id"
shot psnr "runs/$run_id/artifacts/plots/psnr.png"
shot grid "runs/$run_id/artifacts/$grid"
shot models "models"
