"""Open a sweep's experiment in the MLflow UI that `raylens ui` serves and screenshot it in
headless Chromium: the runs table (nested trial runs under the sweep run, with WMDP/MMLU and the
pareto tags) and the chart view.

    python scripts/ui_screenshot.py EXPERIMENT OUT_DIR [--uri URI] [--port P]

Writes OUT_DIR/runs.png (the runs table) and OUT_DIR/charts.png (the chart view with a
scatter of wmdp against mmlu added); exits 1 if the UI did not come up, does not
know the experiment, or a picture is missing. Needs Debian's chromium (`apt-get install
chromium`) and Playwright (`pip install -e .[ui-test]`; it drives that Chromium, nothing is
downloaded); run from the folder whose raylens-mlflow.db holds the sweep (or pass --uri).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COLUMNS = ("wmdp", "mmlu", "status", "pareto", "pareto_rank")
"""Run-table columns shown (metric and tag names); the sweep's searched params are added."""


def free_port() -> int:
    """A free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float) -> bool:
    """Whether ``url`` answers within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(1)
    return False


def experiment_id(base: str, name: str) -> str:
    """The MLflow experiment id of ``name`` on the server at ``base``."""
    query = urllib.parse.urlencode({"experiment_name": name})
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/experiments/get-by-name?{query}",
                                timeout=30) as response:
        return json.loads(response.read())["experiment"]["experiment_id"]


def searched_params(base: str, exp: str) -> list[str]:
    """The flat keys the sweep searched (its run's ``space.<key>`` params)."""
    body = json.dumps({"experiment_ids": [exp], "filter": "tags.role = 'sweep'",
                       "max_results": 1}).encode()
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read()).get("runs", [])
    params = runs[0]["data"].get("params", []) if runs else []
    return [p["key"][len("space."):] for p in params if p["key"].startswith("space.")]


def screenshot(chromium: str, base: str, exp: str, params: list[str], out: Path) -> None:
    """Drive the UI as a person would (Playwright on Debian's Chromium): the experiment's runs
    in the Model training view, the sweep run expanded to its trial runs, the objective, tag and
    searched-parameter columns shown -> runs.png; then the chart view with a scatter of wmdp
    against mmlu added -> charts.png."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1800, "height": 900})
        page.goto(f"{base}/#/experiments/{exp}/runs")
        page.get_by_role("button", name="Model training").click(timeout=60_000)
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.get_by_role("button", name=re.compile("Columns")).first.click()
        for name in ("Dataset", "Source", "Models", *COLUMNS, *params):  # toggles
            page.locator(f"span[title='{name}']").first.click()
        page.keyboard.press("Escape")
        close = page.get_by_role("button", name="Close")  # the assistant side panel
        if close.count():
            close.first.click()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "runs.png"))
        page.locator("label:has(input[value=CHART])").click()
        page.get_by_role("button", name=re.compile("Add chart")).first.click()
        page.get_by_text("Scatter chart", exact=True).click()
        dialog = page.get_by_role("dialog")
        axes = dialog.get_by_role("combobox")  # chart type, X axis, Y axis
        for i, metric in ((1, "wmdp"), (2, "mmlu")):
            shown = axes.nth(i).get_attribute("aria-description")  # the metric it shows
            dialog.get_by_text(shown, exact=True).first.click()
            page.keyboard.type(metric)
            page.get_by_text(metric, exact=True).last.click()
        dialog.get_by_role("button", name="Add chart").click()
        page.mouse.move(0, 0)
        page.wait_for_timeout(2000)
        page.get_by_text("wmdp vs. mmlu", exact=True).first.scroll_into_view_if_needed()
        page.screenshot(path=str(out / "charts.png"))
        browser.close()


def main(argv: list[str] | None = None) -> int:
    """Screenshot the MLflow UI's runs table and front chart of an experiment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment")
    parser.add_argument("out_dir")
    parser.add_argument("--uri", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 1
    port = args.port or free_port()
    command = [sys.executable, "-m", "raylens.cli", "ui", "--port", str(port)]
    if args.uri:
        command += ["--uri", args.uri]
    server = subprocess.Popen(command, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for(f"{base}/health", 120):
            print(f"the MLflow UI did not answer at {base}/health", file=sys.stderr)
            return 1
        exp = experiment_id(base, args.experiment)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        screenshot(chromium, base, exp, searched_params(base, exp), out)
        for name in ("runs.png", "charts.png"):
            if not (out / name).exists() or (out / name).stat().st_size < 10_000:
                print(f"no picture at {out / name}", file=sys.stderr)
                return 1
            print(out / name)
        return 0
    finally:
        import os

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
