#!/usr/bin/env python
"""Take the README's screenshot of the live dashboard (deploy/dashboard-screenshot.png).

Starts `inflight-serve` on the bundled model (CPU), runs a load that changes every 10 s (4 to 16 clients sending
completions of 32 tokens), sends a bad request and one for another model, drops one stream, and after a minute
photographs /dashboard in Debian's chromium (driven by Playwright; `apt-get install chromium`, `pip install
playwright`, never `playwright install`).

Usage (from the repository root): python tools/dashboard_screenshot.py [--out deploy/dashboard-screenshot.png]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLIENTS_EVERY_10_S = (4, 8, 16, 12, 6, 16)
REPO_ROOT = Path(__file__).resolve().parents[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    environ = {**os.environ, "INFLIGHT_PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "server", "--device", "cpu", "--num-kv-blocks", "256",
                               "--max-num-seqs", "8"], cwd=REPO_ROOT, env=environ, stdout=log.open("w"),
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit(f"inflight-serve did not start; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Take the README's screenshot of the live dashboard.")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "deploy" / "dashboard-screenshot.png")
    parser.add_argument("--port", type=int, default=18124)
    parser.add_argument("--seconds", type=int, default=62, help="how long the load runs before the screenshot")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    url = f"http://127.0.0.1:{args.port}"
    server = start_server(args.port, Path("/tmp/dashboard_screenshot_server.log"))
    num_active = [0]  # clients 0..num_active-1 send; the others wait
    stopping = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            while not stopping.is_set():
                if i >= num_active[0]:
                    time.sleep(0.1)
                    continue
                http.post(url + "/v1/completions", json={"model": "inflight-tiny", "prompt": f"Client {i} says",
                                                         "max_tokens": 32, "temperature": 1.0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(max(CLIENTS_EVERY_10_S))]
    try:
        for thread in threads:
            thread.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/dashboard")
            for second in range(args.seconds):
                num_active[0] = CLIENTS_EVERY_10_S[(second // 10) % len(CLIENTS_EVERY_10_S)]
                if second == 20:
                    httpx.post(url + "/v1/completions",
                               json={"model": "inflight-tiny", "prompt": "x", "temperature": 9})
                if second == 35:
                    httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
                if second == 45:  # a client that leaves mid-stream: counted as cancelled
                    with httpx.stream("POST", url + "/v1/completions", json={
                            "model": "inflight-tiny", "prompt": "x", "max_tokens": 500, "stream": True}) as stream:
                        next(stream.iter_lines())
                time.sleep(1)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        stopping.set()
        for thread in threads:
            thread.join()
        server.terminate()
        server.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
