"""Train one (setup, operator, seed), watched or not, each in a freshly forked process with a timeout.

The parent imports torch and Lightning once; every run is a ``fork`` of it, so a run pays no import
time, cannot leak state (hooks, RNG, warnings filters) into the next, and a hung or crashing run is
killed without taking the benchmark down.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from . import operators, setups


@dataclass(frozen=True)
class Spec:
    setup: str
    operator: str  # operators.ORIGINAL or an operator name
    seed: int
    watched: bool

    @property
    def key(self) -> str:
        return f"{self.setup}/{self.operator}/{self.seed}"


def mutant_config(setup: str, operator: str) -> dict[str, Any]:
    cfg = setups.config(setup)
    if operator != operators.ORIGINAL:
        cfg = operators.BY_NAME[operator].apply(cfg)
    return cfg


def train(spec: Spec, workdir: str) -> dict[str, Any]:
    """One training run in this process; returns plain JSON-able results."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg = mutant_config(spec.setup, spec.operator)
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    train_set, (xv, yv), classes = setups.data(cfg, spec.seed)
    module = setups.Module(cfg, train_set, classes)
    watch = None
    callbacks = []
    if spec.watched:
        from lightning_watch import Watch

        watch = Watch()
        callbacks.append(watch)
    val = None
    if cfg["validate"]:
        val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=len(yv))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=cfg["epochs"],
        max_steps=cfg["max_steps"],
        logger=TensorBoardLogger(workdir, name="run"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=cfg["grad_clip"],
        limit_val_batches=1.0 if val is not None else 0,
    )
    start = time.perf_counter()
    trainer.fit(module, val_dataloaders=val)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        out = module(xv)
        acc = setups.accuracy(cfg, out, yv)
        out_finite = bool(torch.isfinite(out).all())
        param_sum = float(sum(p.detach().double().abs().sum() for p in module.parameters()))
    final_loss = float(module.last_loss) if module.last_loss is not None else float("nan")
    alerts = []
    if watch is not None:
        alerts = [
            {"code": a.code, "severity": a.severity, "step": a.step, "module": a.module, "message": a.message}
            for a in watch.alerts
        ]
    return {
        "key": spec.key,
        "watched": spec.watched,
        "val_acc": acc,
        "nan": not (out_finite and setups.finite(final_loss) and setups.finite(param_sum)),
        "final_loss": final_loss,
        "param_sum": param_sum,
        "steps": int(trainer.global_step),
        "seconds": round(seconds, 3),
        "alerts": alerts,
        "error": None,
    }


def _child(spec: Spec, conn) -> None:
    # stdout/stderr of the run go to a log file: the benchmark's own output stays readable
    with tempfile.TemporaryDirectory(prefix="diag_") as workdir, open(os.path.join(workdir, "log.txt"), "w+") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            result = train(spec, workdir)
        except BaseException as exc:  # reported, not raised: the parent scores crashes
            log.flush()
            log.seek(0)
            result = {
                "key": spec.key,
                "watched": spec.watched,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
                "log_tail": log.read()[-2000:],
                "alerts": [],
            }
        conn.send(result)
        conn.close()


def run_many(specs: list[Spec], jobs: int = 1, timeout: float = 300.0, progress: bool = True) -> dict[Spec, dict]:
    """Run ``specs`` in forked children, ``jobs`` at a time; each is killed after ``timeout`` seconds."""
    ctx = mp.get_context("fork")
    pending = list(specs)
    running: dict[Spec, tuple[Any, Any, float]] = {}
    results: dict[Spec, dict] = {}
    while pending or running:
        while pending and len(running) < max(1, jobs):
            spec = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            running[spec] = (proc, parent, time.monotonic())
        time.sleep(0.02)
        for spec, (proc, conn, started) in list(running.items()):
            result = None
            if conn.poll():
                try:
                    result = conn.recv()
                except EOFError:
                    result = {"key": spec.key, "watched": spec.watched, "error": "child exited without a result"}
                proc.join(5)
            elif not proc.is_alive():
                result = {"key": spec.key, "watched": spec.watched, "error": f"child died (exit {proc.exitcode})"}
            elif time.monotonic() - started > timeout:
                proc.kill()
                proc.join(5)
                result = {"key": spec.key, "watched": spec.watched, "error": f"timeout after {timeout:.0f} s"}
            if result is not None:
                result.setdefault("alerts", [])
                results[spec] = result
                del running[spec]
                conn.close()
                if progress:
                    what = result.get("error") or f"acc {result['val_acc']:.3f} {result['seconds']:.1f}s"
                    tag = "W" if spec.watched else "-"
                    print(f"  [{len(results)}/{len(specs)}] {tag} {spec.key}: {what}", flush=True)
    return results
