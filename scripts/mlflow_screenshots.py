"""Screenshots of a vqtok run in the MLflow UI, as a user sees it (headless Chromium).

    python scripts/mlflow_screenshots.py RUN_FOLDER [--out docs/images]

RUN_FOLDER is a training run: it holds `mlflow_run_id` and `config.yaml`, whose
`run.tracking_uri` names the store; unset, the run's own `RUN_FOLDER/mlflow/mlflow.db`. Needs
`chromium` (Debian: `apt-get install chromium`). The pages open in MLflow's "Model training"
layout (`?workflowType=machine_learning`, the layout vqtok's links use).

Chromium is driven over its DevTools protocol (aiohttp, a Ray dependency, speaks the
websocket) rather than `chromium --screenshot` because MLflow 3.17 opens its Assistant panel
on a browser's first visit to a local server (`mlflow.assistant.fab.autoOpenedOnFirstLoad`
in the UI's bundle) and keeps it as the user leaves it: the script closes it once with its
× button, as a user does, and the other pages are taken as that user sees them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import yaml
from mlflow import MlflowClient

from pipelines.tracking.server import start_mlflow_server, stop_mlflow_server
from pipelines.tracking.tracker import run_store_uri

WIDTH, HEIGHT = 1600, 1000
CLOSE_ASSISTANT = """(() => {
  const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click();
  return b !== null; })()"""


class Page:
    """One Chromium tab over the DevTools protocol: call a method, await its result."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async for msg in self.ws:
            data = json.loads(msg.data)
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
        raise RuntimeError(f"{method}: the browser closed the connection")

    async def open(self, url: str, settle: float = 6.0) -> None:
        await self.call("Page.navigate", url="about:blank")  # a whole load, not a hash change
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(settle)  # the UI renders after its API calls: no load event says so

    async def shot(self, path: Path) -> None:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        print(path)


async def _take(debug_port: int, base: str, pages: dict[str, str], out: Path) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list") as r:
        ws_url = next(t for t in json.load(r) if t["type"] == "page")["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
        page = Page(ws)
        await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                        deviceScaleFactor=1, mobile=False)  # fmt: skip
        first = True
        for name, path in pages.items():
            await page.open(base + path)
            if first:  # the Assistant panel opened by itself: close it as a user would
                closed = await page.call("Runtime.evaluate", expression=CLOSE_ASSISTANT,
                                         returnByValue=True)  # fmt: skip
                print("assistant panel closed:", closed["result"].get("value"))
                await page.open(base + path, settle=3.0)
                first = False
            await page.shot(out / f"mlflow-{name}.png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a training run folder (holds mlflow_run_id)")
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args(argv)
    run = args.run.resolve()
    run_id = (run / "mlflow_run_id").read_text().strip()
    uri = yaml.safe_load((run / "config.yaml").read_text())["run"].get("tracking_uri")
    uri = uri or run_store_uri(run)
    exp = MlflowClient(uri).get_run(run_id).info.experiment_id
    grid = sorted((run / "tracking/files/recon").glob("*.png"))[-1].name
    args.out.mkdir(parents=True, exist_ok=True)
    q = "?workflowType=machine_learning"
    pages = {
        "run": f"runs/{run_id}{q}",
        "psnr": f"runs/{run_id}/artifacts/plots/psnr.png{q}",
        "grid": f"runs/{run_id}/artifacts/recon/{grid}{q}",
        "models": f"models{q}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "chromium"
        browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]  # fmt: skip
        server, url = start_mlflow_server(uri, Path(tmp) / "artifacts")  # runs keep theirs
        chromium = subprocess.Popen(browser, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            for _ in range(100):
                if port_file.exists() and port_file.read_text().strip():
                    break
                time.sleep(0.2)
            debug_port = int(port_file.read_text().split()[0])
            base = f"{url}/#/experiments/{exp}/"
            asyncio.run(_take(debug_port, base, pages, args.out))
        finally:
            chromium.terminate()
            chromium.wait(timeout=30)
            stop_mlflow_server(server)


if __name__ == "__main__":
    main()
