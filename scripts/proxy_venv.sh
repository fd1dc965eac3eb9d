#!/usr/bin/env bash
# Opt-in: a venv with the litellm proxy, for integrations/litellm/tests/test_proxy.py.
#
#   scripts/proxy_venv.sh [VENV]        # default VENV: target/venv-litellm-proxy
#   LITELLM_PROXY_PYTHON=target/venv-litellm-proxy/bin/python \
#       target/venv-litellm/bin/python -m pytest integrations/litellm/tests/test_proxy.py -q
#
# Installs litellm 1.110.2 (the version the plugin tests pin) with the requirements of its
# `proxy` extra listed in integrations/litellm/tests/proxy-requirements.txt (the extra itself
# does not install from the index here; that file says why), then the plugin without deps.
# `LITELLM_PROXY_EXTRA=1` installs `litellm[proxy]==1.108.7` instead: the newest version whose
# extra installs as it is. Takes about 1.5 minutes (with or without a pip cache), ~760 MB.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV="${1:-${CARGO_TARGET_DIR:-$ROOT/target}/venv-litellm-proxy}"

start=$(date +%s)
python3 -m venv "$VENV"
if [[ "${LITELLM_PROXY_EXTRA:-}" == 1 ]]; then
    "$VENV/bin/python" -m pip install -q 'litellm[proxy]==1.108.7'
else
    "$VENV/bin/python" -m pip install -q -r integrations/litellm/tests/proxy-requirements.txt
fi
"$VENV/bin/python" -m pip install -q --no-deps ./integrations/litellm
LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --version
echo "proxy venv ready in $(($(date +%s) - start))s: LITELLM_PROXY_PYTHON=$VENV/bin/python"
