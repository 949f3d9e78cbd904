#!/usr/bin/env bash
# Start the fracture-ops MLflow tracking server (UI + REST API + artifact proxy).
#
# The same script runs on a laptop (defaults: SQLite store and local artifacts under
# ./data/mlflow, bound to 127.0.0.1) and as the ENTRYPOINT of docker/mlflow in Kubernetes
# (PostgreSQL store, s3:// artifacts, basic auth; see infra/k8s/mlflow.yaml).
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      SQLAlchemy URI of the tracking store
#                                 (default: sqlite:///<MLFLOW_DATA_DIR>/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts live (default: <MLFLOW_DATA_DIR>/artifacts)
#   MLFLOW_DATA_DIR               local state folder for the defaults (default: ./data/mlflow)
#   MLFLOW_HOST                   bind address (default: 127.0.0.1; the container sets 0.0.0.0)
#   MLFLOW_PORT                   port (default: 5000)
#   MLFLOW_WORKERS                uvicorn worker processes (mlflow's default: 4)
#   MLFLOW_APP_NAME               "fracture-ops": MLflow's basic authentication plus the
#                                 server-side approval stamp (fracture_ops.registry.approval_app;
#                                 approvers from FRACTURE_OPS_APPROVERS; champion alias only
#                                 for FRACTURE_OPS_PROMOTERS, challenger also for
#                                 FRACTURE_OPS_PIPELINE_USERS, gate evidence only from
#                                 FRACTURE_OPS_GATE_USERS; approvals signed with the EC key at
#                                 FRACTURE_OPS_APPROVAL_KEY; every write decided by the table of
#                                 `fracture-ops registry guard-rules`); "basic-auth": auth only
#   MLFLOW_AUTH_CONFIG_PATH       auth config to use as is; when unset and MLFLOW_APP_NAME is
#                                 basic-auth, mlflow/basic_auth.ini is rendered to a private temp
#                                 file with database_uri = MLFLOW_AUTH_DATABASE_URI
#                                 (default: sqlite:///<MLFLOW_DATA_DIR>/basic_auth.db)
#   MLFLOW_TLS_CERT_FILE,         serve HTTPS with this certificate (chain) and key (both PEM;
#   MLFLOW_TLS_KEY_FILE           in Kubernetes the cert-manager Secret fracture-ops-mlflow-tls)
#   MLFLOW_PID_FILE               write the server's pid here (the script execs mlflow, so the pid
#                                 is the server's own; SIGTERM to it stops the whole server)
#   MLFLOW_BIN, PYTHON            executables to use (default: mlflow, python3 from PATH)
# Basic auth also needs MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD (first start only)
# and MLFLOW_FLASK_SERVER_SECRET_KEY, which MLflow reads from the environment itself; so does
# MLFLOW_SERVER_ALLOWED_HOSTS (Host-header allow-list; MLflow's default is localhost + private IPs).
# Extra arguments are passed through to `mlflow server`.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mlflow_bin="${MLFLOW_BIN:-mlflow}"
python_bin="${PYTHON:-python3}"

data_dir="${MLFLOW_DATA_DIR:-./data/mlflow}"
mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"

backend_uri="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${data_dir}/mlflow.db}"
artifacts_destination="${MLFLOW_ARTIFACTS_DESTINATION:-${data_dir}/artifacts}"

args=(server
  --backend-store-uri "$backend_uri"
  --artifacts-destination "$artifacts_destination"
  --serve-artifacts
  --host "${MLFLOW_HOST:-127.0.0.1}"
  --port "${MLFLOW_PORT:-5000}")
if [[ -n "${MLFLOW_WORKERS:-}" ]]; then
  args+=(--workers "$MLFLOW_WORKERS")
fi
if [[ -n "${MLFLOW_TLS_CERT_FILE:-}" || -n "${MLFLOW_TLS_KEY_FILE:-}" ]]; then
  if [[ ! -r "${MLFLOW_TLS_CERT_FILE:-}" || ! -r "${MLFLOW_TLS_KEY_FILE:-}" ]]; then
    echo "start-server.sh: MLFLOW_TLS_CERT_FILE and MLFLOW_TLS_KEY_FILE must both name readable files" >&2
    exit 2
  fi
  args+=(--uvicorn-opts "--ssl-certfile ${MLFLOW_TLS_CERT_FILE} --ssl-keyfile ${MLFLOW_TLS_KEY_FILE}")
fi

# Render the auth config from the template in this folder: the database URI may carry a
# password, so it comes from the environment and lands only in a 0600 file in a private dir.
render_auth_config() {
  local out_dir
  out_dir="$(mktemp -d "${TMPDIR:-/tmp}/fracture-ops-mlflow-auth.XXXXXX")"
  MLFLOW_AUTH_DATABASE_URI="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///${data_dir}/basic_auth.db}" \
    "$python_bin" - "${MLFLOW_AUTH_TEMPLATE:-$script_dir/basic_auth.ini}" "$out_dir/basic_auth.ini" <<'PY'
import configparser, os, sys

template, target = sys.argv[1], sys.argv[2]
config = configparser.ConfigParser()
if not config.read(template):
    sys.exit(f"auth config template not found: {template}")
config["mlflow"]["database_uri"] = os.environ["MLFLOW_AUTH_DATABASE_URI"]
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as handle:
    config.write(handle)
PY
  printf '%s\n' "$out_dir/basic_auth.ini"
}

if [[ -n "${MLFLOW_APP_NAME:-}" ]]; then
  args+=(--app-name "$MLFLOW_APP_NAME")
  if [[ ( "$MLFLOW_APP_NAME" == "basic-auth" || "$MLFLOW_APP_NAME" == "fracture-ops" ) \
        && -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    MLFLOW_AUTH_CONFIG_PATH="$(render_auth_config)"
    export MLFLOW_AUTH_CONFIG_PATH
  fi
fi

# MLflow's job runner serves GenAI evaluation jobs this platform does not use; it would start
# extra consumer processes. Opt back in by setting the variable to true.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ -n "${MLFLOW_PID_FILE:-}" ]]; then
  # exec keeps this pid, so the file names the server process itself
  printf '%s\n' "$$" > "$MLFLOW_PID_FILE"
fi
exec "$mlflow_bin" "${args[@]}" "$@"
