"""Every logger a user picks: W&B (offline) and MLflow (local file store) get scalars, alert texts,
the health report and the pictures, read back with the packages' own formats.

Skipped when ``wandb`` / ``mlflow`` (``mlflow-skinny`` is enough) is not installed: ``pip install -e .[loggers]``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyRegressor, regression_loader

from lightning_watch import Watch
from lightning_watch.writers import MLflowWriter, WandbWriter, Writer, writer_for

STEPS, EVERY = 6, 2


def _fit(logger, tmp_path: Path) -> Watch:
    torch.manual_seed(0)
    watch = Watch(log_every_n_steps=EVERY, final_pictures=True)  # the end-of-fit pictures, whatever the budget
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=STEPS,
        logger=logger,
        callbacks=[watch],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(TinyRegressor(), regression_loader())
    return watch


def test_mlflow_run_holds_scalars_alert_texts_report_and_pictures(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    # mlflow >= 3.7 refuses the file store unless asked (a database is its default now)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="lw", tracking_uri=uri)
    watch = _fit(logger, tmp_path)
    assert isinstance(writer_for(logger), MLflowWriter)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    history = client.get_metric_history(logger.run_id, "watch.grad_norm/01.net.0")
    assert [m.step for m in history] == [1, 3, 5]
    assert history[-1].value == pytest.approx(watch.last_snapshot.get("grad_norm", "net.0"), rel=1e-6)
    assert run.data.metrics["watch.global/grad_norm"] == pytest.approx(watch.last_snapshot.get("grad_norm"), rel=1e-6)

    def files(path=""):
        for item in client.list_artifacts(logger.run_id, path):
            yield from files(item.path) if item.is_dir else [item.path]

    artifacts = set(files())
    local = Path(client.download_artifacts(logger.run_id, "lightning_watch", str(tmp_path / "down")))
    for alert in watch.alerts:  # one text per alert, under its code (and module)
        where = f"/{alert.module}" if alert.module else ""
        name = f"lightning_watch/alerts/{alert.code}{where}/step_{max(alert.step, 0):07d}.md"
        assert name in artifacts, (name, sorted(artifacts))
        assert f"`{alert.code}`" in (local.parent / name).read_text()
    reports = [a for a in artifacts if a.startswith("lightning_watch/watch_report/health/")]
    assert len(reports) == 1 and "net.0" in (local.parent / reports[0]).read_text()
    pictures = {a for a in artifacts if a.startswith("lightning_watch/watch_pictures/") and a.endswith(".png")}
    assert {p.split("/")[2] for p in pictures} >= {"grad_flow", "dead_frac_heatmap"}
    assert all((local.parent / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file, decoded with wandb's own protobuf schema.

    wandb >= 0.19 no longer ships a Python reader (the Go core writes the file), and ``wandb.Api``
    is online only; the framing is LevelDB's log format (32 KiB blocks, 7-byte chunk headers)
    after a 7-byte ``:W&B`` header.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            out.append(record)
            pending = b""
        elif kind in (2, 3):  # first / middle chunk
            pending = chunk if kind == 2 else pending + chunk
    return out


def test_wandb_offline_run_holds_scalars_alert_texts_report_and_pictures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="lw", save_dir=str(tmp_path), offline=True)
    watch = _fit(logger, tmp_path)
    assert isinstance(writer_for(logger), WandbWriter)
    wandb.finish()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    grad = [
        (row["trainer/global_step"], row["watch.grad_norm/01.net.0"])
        for row in rows
        if "watch.grad_norm/01.net.0" in row
    ]
    assert [step for step, _ in grad] == [1, 3, 5]
    assert grad[-1][1] == pytest.approx(watch.last_snapshot.get("grad_norm", "net.0"), rel=1e-6)

    media = run_file.parent / "files"
    for alert in watch.alerts:
        where = f"/{alert.module}" if alert.module else ""
        key = f"alerts/{alert.code}{where}"
        row = next(row for row in rows if f"{key}/path" in row)
        assert row[f"{key}/_type"] == "html-file" and row["trainer/global_step"] == max(alert.step, 0)
        assert f"{alert.code}" in (media / row[f"{key}/path"]).read_text()
    report = next(row for row in rows if "watch_report/health/path" in row)
    assert "net.0" in (media / report["watch_report/health/path"]).read_text()
    pictures = {key.split("/")[1] for row in rows for key in row if key.startswith("watch_pictures/")}
    assert {"grad_flow", "dead_frac_heatmap"} <= pictures
    for row in rows:
        for key, value in row.items():
            if key.startswith("watch_pictures/") and key.endswith("/path"):
                assert (media / value).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_any_other_logger_gets_scalars_and_nothing_breaks(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv")
    watch = _fit(logger, tmp_path)
    writer = writer_for(logger)
    assert type(writer) is Writer and not writer.shows_media
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "watch.grad_norm/01.net.0" in header and "watch.global/grad_norm" in header
    assert watch.views.last_report is not None  # the report was still built (and health.md written)
    assert (Path(logger.log_dir) / "health.md").is_file()
