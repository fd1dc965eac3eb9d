"""A real litellm proxy process with the plugin, against a real sidecar (opt-in).

Runs only when `LITELLM_PROXY_PYTHON` names the python of a venv with the litellm proxy
(`scripts/proxy_venv.sh` makes one); skipped otherwise, even under CI. When it is set but the
proxy cannot start, the test skips, except under `CI`, where it fails. The proxy loads the
plugin from this checkout (`PYTHONPATH`), whatever the venv has installed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, nanos, unavailable, wait_until

PROXY_PYTHON = os.environ.get("LITELLM_PROXY_PYTHON")

pytestmark = pytest.mark.skipif(
    not PROXY_PYTHON, reason="LITELLM_PROXY_PYTHON is not set (scripts/proxy_venv.sh makes the venv)"
)

# One file for both processes: the proxy reads model_list and litellm_settings, the sidecar
# the top-level provider_budget_config (litellm's own filter never sees it).
CONFIG = """
model_list:
  - model_name: claude
    litellm_params: {model: anthropic/claude-haiku-4-5, mock_response: hi}
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, mock_response: hi}
provider_budget_config:
  anthropic: {budget_limit: 100, time_period: 1d}
  openai: {budget_limit: 0, time_period: 1d}
litellm_settings:
  callbacks: ["provider_budgets_litellm.proxy_handler_instance"]
"""

START_TIMEOUT = 180.0  # about 15 s here; the proxy imports a lot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """`litellm --config FILE` on a loopback port, in its own process group."""

    def __init__(self, config: Path, sidecar_url: str, workdir: Path):
        python = Path(PROXY_PYTHON)
        self.cli = python.parent / "litellm"
        if not self.cli.exists():
            unavailable(f"no `litellm` command beside LITELLM_PROXY_PYTHON={PROXY_PYTHON}")
        self.key = "sk-" + secrets.token_hex(16)  # the proxy refuses well-known keys (sk-1234)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "proxy.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROVIDER_BUDGETS_", "LITELLM_"))}
        env.update(
            LITELLM_MASTER_KEY=self.key,
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no network
            LITELLM_LOG="ERROR",
            PROVIDER_BUDGETS_URL=sidecar_url,
            PROVIDER_BUDGETS_FAIL_OPEN="false",
            PYTHONPATH=str(REPO / "integrations" / "litellm" / "src"),
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(self.cli), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                unavailable(f"the litellm proxy exited with {self.proc.returncode} at start:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        unavailable(f"the litellm proxy did not answer within {START_TIMEOUT}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def chat(self, model: str):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]}).encode()
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST")
        req.add_header("content-type", "application/json")
        req.add_header("authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read() or b"null")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_a_real_proxy_records_spend_and_refuses_a_spent_provider(sidecars):
    side = sidecars({}, config_text=CONFIG)
    proxy = Proxy(side.config, side.url, side.dir)
    try:
        status, headers, body = proxy.chat("claude")
        assert status == 200, (body, proxy.tail())
        assert body["choices"][0]["message"]["content"] == "hi"
        cost = float(headers["x-litellm-response-cost"])
        assert cost > 0, headers
        # The spend is posted after the response: wait for exactly litellm's cost.
        wait_until(lambda: side.spend_nanos().get("anthropic") == nanos(cost), "the proxy's spend", timeout=20)

        status, _, body = proxy.chat("gpt")  # openai's limit is 0
        assert status == 429, (body, proxy.tail())
        assert "Exceeded budget for provider openai" in body["error"]["message"], body
        time.sleep(0.5)
        assert side.spend_nanos() == {"anthropic": nanos(cost), "openai": 0}
    finally:
        proxy.stop()
