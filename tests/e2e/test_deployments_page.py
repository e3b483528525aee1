"""The Deployments page end to end: a real api-server (+ dag-processor) with the plugin, a ledger seeded with three
versions, and Debian's chromium (headless) loading the page through the token handoff: the DOM holds the table
rows and the charts, a screenshot of the page inside Airflow's UI is kept (tests/artifacts/; copied over
docs/images/deployments.png only with LORA_DEPLOY_REFRESH_DOCS_IMAGES=1), links open in the UI, and the "make
current" button triggers rollback_<model>."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from include.lmstudio import ledger as L
from include.units import format_bytes
from plugins.lora_deploy_deployments import LoraDeployDeploymentsPlugin
from tests.conftest import ROOT, SESSION_DIR
from tests.e2e.airflow_services import AirflowServices, airflow_services, wait_for
from tests.plugins.test_deployments_api import MODEL, SEED, seed_ledger, write_config

pytestmark = pytest.mark.e2e  # a real api-server, dag-processor and chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--window-size=1400,900", "--virtual-time-budget=20000"]
ROUTE = LoraDeployDeploymentsPlugin.external_views[0]["url_route"]
BASE = SESSION_DIR / "deployments-page"
LEDGER = L.ledger_path(BASE / "artifacts", MODEL)


def artifacts_dir() -> Path:
    """Where test artifacts go: ``$LORA_DEPLOY_TEST_ARTIFACTS`` or tests/artifacts/ (gitignored)."""
    path = Path(os.environ.get("LORA_DEPLOY_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (idempotent; needs root or sudo)."""
    found = shutil.which("chromium")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


# The page's buttons only need a DAG named rollback_<model> taking Param "version" (as dags/deploy_models.py
# builds it); this one does nothing, and no scheduler runs, so the test is independent of the deploy DAGs.
ROLLBACK_DAG = """
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

with DAG("rollback_demo", schedule=None, params={"version": Param(None, type=["null", "string"])}):
    EmptyOperator(task_id="promote")
"""


@pytest.fixture(scope="module")
def deployments_server() -> Iterator[AirflowServices]:
    """An api-server + dag-processor with the plugin loaded, a config whose artifact root holds demo's three
    versions, and a ``rollback_demo`` DAG for the page's buttons to trigger."""
    base = BASE
    root = base / "artifacts"
    seed_ledger(root)
    config = write_config(base / "models.yaml", root)
    dags = base / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    (dags / "rollback_demo.py").write_text(ROLLBACK_DAG)
    services = airflow_services(base / "airflow", {"LORA_DEPLOY_CONFIG": str(config),
                                                   "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}, plugins=True)
    try:
        services.start(components=("api-server", "dag-processor"))
        yield services
    finally:
        services.stop()


def run_chromium(binary: str, url: str, *mode: str) -> subprocess.CompletedProcess[str]:
    """One headless chromium run with a fresh profile; ``mode`` is ``--dump-dom`` or ``--screenshot=<file>``."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url],
                              capture_output=True, text=True, timeout=120, check=False)


class DevTools:
    """Headless chromium driven over the DevTools protocol (to click inside Airflow's UI); a context manager."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS[:-1], f"--user-data-dir={self.profile}",
                                         "--remote-debugging-port=0", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.calls = 0

    def __enter__(self) -> DevTools:
        from websockets.sync.client import connect

        active = Path(self.profile) / "DevToolsActivePort"
        port = wait_for(lambda: active.is_file() and active.read_text().split()[:1], timeout_s=30,
                        what="chromium's DevTools port")[0]
        targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        for _ in range(10):  # chromium's helper processes may still be writing to the profile for a moment
            shutil.rmtree(self.profile, ignore_errors=True)
            if not Path(self.profile).exists():
                break
            time.sleep(0.5)

    def call(self, method: str, **params: object) -> dict[str, object]:
        """One DevTools command; its result."""
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str) -> object:
        """Evaluate ``expression`` in the top page; its JSON value."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")  # type: ignore[union-attr]


FRAME = "document.querySelector('iframe[title=\"Deployments\"]')"


def test_airflow_ui_embeds_the_page_and_its_links_open_in_the_ui(deployments_server: AirflowServices,
                                                                 chromium: str) -> None:
    url = f"{deployments_server.url}/lora-deploy/signin#token={deployments_server.token}&next=/plugin/{ROUTE}"
    with DevTools(chromium) as browser:
        browser.call("Page.navigate", url=url)
        loaded = wait_for(lambda: browser.js(f"{FRAME}?.contentDocument?.body?.getAttribute('data-loaded')"),
                          timeout_s=60, what="the Deployments page inside Airflow's UI")
        assert loaded == "true"
        rows = browser.js(f"[...{FRAME}.contentDocument.querySelectorAll('tr.version-row')]"
                          ".map(r => r.dataset.version)")
        assert rows == ["checkpoint-30", "checkpoint-20", "checkpoint-10"]
        href = browser.js(f"{FRAME}.contentDocument.querySelector('tr.current a.airflow-link').getAttribute('href')")
        assert href == "/dags/deploy_demo/runs/manual__2026-11-08T10%3A00%3A00%2B00%3A00"
        browser.js(f"{FRAME}.contentDocument.querySelector('tr.current a.airflow-link').click()")
        path = wait_for(lambda: (p := browser.js("location.pathname")).startswith("/dags/") and p, timeout_s=20,
                        what="the Airflow UI to open the DAG run")
        assert path == href
        # the UI itself shows the DAG run (its router took the click), the Deployments frame is gone
        wait_for(lambda: not browser.js(f"!!{FRAME}") and
                 "manual__2026-11-08T10:00:00+00:00" in str(browser.js("document.body.innerText")),
                 timeout_s=20, what="the Airflow UI's DAG run view")


def test_api_is_mounted_behind_airflow_auth(deployments_server: AirflowServices) -> None:
    base = f"{deployments_server.url}/lora-deploy/api/models"
    assert requests.get(base, timeout=10).status_code == 401
    assert requests.get(base, headers={"Authorization": "Bearer forged.jwt.token"}, timeout=10).status_code == 403
    listing = requests.get(base, headers={"Authorization": f"Bearer {deployments_server.token}"}, timeout=10)
    assert listing.status_code == 200, listing.text
    assert listing.json()["models"][0]["current"] == "checkpoint-20"
    plugins = deployments_server.api("GET", "/plugins").json()["plugins"]
    [ours] = [p for p in plugins if p["name"] == "lora_deploy_deployments"]
    assert [v["name"] for v in ours["external_views"]] == ["Deployments"]
    assert [a["url_prefix"] for a in ours["fastapi_apps"]] == ["/lora-deploy"]


def test_headless_chromium_renders_the_table_and_charts(deployments_server: AirflowServices, chromium: str) -> None:
    url = f"{deployments_server.url}/lora-deploy/signin#token={deployments_server.token}"
    started = time.monotonic()
    dom = run_chromium(chromium, url, "--dump-dom")
    dom_s = time.monotonic() - started
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    (artifacts_dir() / "deployments.html").write_text(html)
    assert 'data-loaded="true"' in html, f"the page did not load its data:\n{html[-3000:]}"
    rows = re.findall(r'<tr class="version-row[^"]*" data-version="([^"]+)"', html)
    assert rows == ["checkpoint-30", "checkpoint-20", "checkpoint-10"] == sorted(SEED, reverse=True)
    assert re.search(r'<tr class="version-row current" data-version="checkpoint-20"', html)
    current = re.search(r'<tr class="version-row current" data-version="checkpoint-20">(.*?)</tr>', html).group(1)
    assert current.count(">current</span>") == 1  # one badge per state
    # sizes as Slack, the model card and the task logs write them (decimal MB)
    assert f">{format_bytes(1_310_000 + 770_000)}</td>" in current and "MiB" not in html
    assert html.count('<svg class="chart"') >= 3
    latency = re.search(r'<polyline class="series" data-series="latency_s" points="([^"]+)"', html)
    assert latency and len(latency.group(1).split()) == 3, "the latency chart must plot the three versions"
    for quant in ("Q8_0", "Q4_K_M"):
        assert f'data-series="{quant}"' in html
    assert 'href="https://huggingface.co/someone/demo-GGUF/tree/v-checkpoint-20"' in html
    assert f'data-model="{MODEL}"' in html

    shot = artifacts_dir() / "deployments.png"
    shot.unlink(missing_ok=True)
    started = time.monotonic()
    # The screenshot shows the page where users see it: in Airflow's UI, behind the "Deployments" nav entry.
    result = run_chromium(chromium, f"{url}&next=/plugin/{ROUTE}", f"--screenshot={shot}")
    shot_s = time.monotonic() - started
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("LORA_DEPLOY_REFRESH_DOCS_IMAGES") == "1":  # on purpose only: tests never write tracked files
        shutil.copyfile(shot, ROOT / "docs" / "images" / "deployments.png")
    print(f"chromium: dump-dom {dom_s:.1f} s, screenshot {shot_s:.1f} s, {shot.stat().st_size} bytes")


def test_make_current_button_triggers_the_rollback_dag_with_the_users_session(deployments_server: AirflowServices,
                                                                             chromium: str) -> None:
    services = deployments_server
    before = LEDGER.read_bytes()
    wait_for(lambda: services.api("GET", "/dags/rollback_demo").ok, timeout_s=120, what="rollback_demo to be parsed")
    url = f"{services.url}/lora-deploy/signin#token={services.token}&next=/plugin/{ROUTE}"
    button = f"{FRAME}.contentDocument.querySelector('button.make-current[data-version=\"checkpoint-10\"]')"
    with DevTools(chromium) as browser:
        browser.call("Page.navigate", url=url)
        wait_for(lambda: browser.js(f"!!{button}"), timeout_s=60, what="the make-current button")
        assert browser.js(f"{FRAME}.contentDocument.querySelector('tr.current button.make-current')") is None
        browser.js(f"{button}.click()")
        assert "confirm" in str(browser.js(f"{button}.textContent")), "the first click only asks to confirm"
        assert services.api("GET", "/dags/rollback_demo/dagRuns").json()["total_entries"] == 0
        browser.js(f"{button}.click()")
        result = f"{button}.parentElement.querySelector('.action-result')"
        run_id = wait_for(lambda: browser.js(f"{result}.getAttribute('data-run-id')"), timeout_s=30,
                          what=f"the triggered run id (page says: {browser.js(result + '.textContent')!r})")
    run = services.api("GET", f"/dags/rollback_demo/dagRuns/{run_id}").json()
    assert run["conf"] == {"version": "checkpoint-10"} and run["run_type"] == "manual"
    assert LEDGER.read_bytes() == before, "the page must never change the ledger itself"
