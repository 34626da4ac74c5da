"""The real client: a TensorBoard server over a Watch log directory serves our scalars, text and images."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from helpers import TinyRegressor, legacy_tag, make_trainer, regression_loader

from lightning_watch import Watch
from lightning_watch.views.images import IMAGE_TAGS
from lightning_watch.views.live import REPORT_TAG

DEADLINE_S = 90  # bounded: the server starts and loads the run well within this on a busy 2-core box


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, **query) -> bytes:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        return response.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_server")
    torch.manual_seed(0)
    watch = Watch(report=False)  # alerts on: the unshuffled loader is flagged as TensorBoard text
    watch.views.final_pictures = True  # a 12-step fit is too short for its pictures' time budget
    published = []
    watch.add_listener(lambda trainer, module, snapshot: published.append(snapshot))
    trainer = make_trainer(root, [watch], max_steps=12, max_epochs=None)
    trainer.fit(TinyRegressor(), regression_loader())
    run = trainer.log_dir[len(str(root)) + 1 :]
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:  # bounded poll: until the run's scalars, text and images are all loaded
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                loaded = [json.loads(_get(base, f"/data/plugin/{p}/tags")) for p in ("scalars", "text", "images")]
                if all(run in tags and tags[run] for tags in loaded):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve run {run!r} within {DEADLINE_S} s")
            time.sleep(0.5)
        yield base, run, watch, published
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_scalar_tags_and_values_served(server):
    base, run, _, published = server
    tags = json.loads(_get(base, "/data/plugin/scalars/tags"))[run]
    expected = {legacy_tag(tag) for snapshot in published for tag in snapshot.scalars()}
    assert expected <= {legacy_tag(tag) for tag in tags}
    assert "watch.grad_norm/01.net.0" in tags  # net.0 is the model's second module, after net
    points = json.loads(_get(base, "/data/plugin/scalars/scalars", run=run, tag="watch.grad_norm/01.net.0"))
    last_step, last_value = points[-1][1], points[-1][2]  # [wall_time, step, value]
    measured = [s for s in published if s.modules("grad_norm")]  # gradients are measured on logging steps
    assert last_step == measured[-1].step == 9 and published[-1].final and published[-1].step == 11
    assert last_value == pytest.approx(measured[-1].get("grad_norm", "net.0"), rel=1e-6)


def test_custom_scalars_layout_served(server):
    base, _, _, _ = server
    layout = json.loads(_get(base, "/data/plugin/custom_scalars/layout"))
    titles = {chart["title"] for category in layout["category"] for chart in category["chart"]}
    assert {"grad_norm", "update_ratio", "dead_frac"} <= titles


def test_report_and_alert_text_served(server):
    base, run, watch, _ = server
    tags = json.loads(_get(base, "/data/plugin/text/tags"))[run]
    report_tag = f"{REPORT_TAG}/text_summary"  # SummaryWriter.add_text's naming
    assert report_tag in tags and "alerts/unshuffled_data/text_summary" in tags
    entries = json.loads(_get(base, "/data/plugin/text/text", run=run, tag=report_tag))
    html = entries[-1]["text"]  # the Markdown rendered to HTML by TensorBoard
    assert "<table>" in html and "net.0" in html and "unshuffled_data" in html
    assert entries[-1]["step"] == watch.views.last_report.last_step


def test_images_served_as_png(server):
    base, run, _, _ = server
    tags = json.loads(_get(base, "/data/plugin/images/tags"))[run]
    assert set(IMAGE_TAGS.values()) <= set(tags)
    listing = json.loads(_get(base, "/data/plugin/images/images", run=run, tag=IMAGE_TAGS["grad_flow"]))
    png = _get(base, "/data/plugin/images/individualImage?" + listing[-1]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
