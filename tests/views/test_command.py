"""``lightning-watch report`` / ``diff`` on real log directories written by short Watch runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyRegressor, legacy_tag, make_trainer, read_scalars, regression_loader

from lightning_watch import Watch
from lightning_watch.command import main
from lightning_watch.views.eventfiles import check_event_file
from lightning_watch.views.live import HEALTH_JSON


def _fit(root: Path, lr: float) -> str:
    torch.manual_seed(0)
    trainer = make_trainer(root, [Watch(report=False, pictures=False, log_every_n_steps=1)], max_epochs=2)
    trainer.fit(TinyRegressor(lr=lr), regression_loader())
    return trainer.log_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    # two runs under one parent (tb/version_0, tb/version_1), plus a third elsewhere
    a = _fit(root, lr=0.1)
    b = _fit(root, lr=0.05)  # same seed and data, half the learning rate
    a_again = _fit(tmp_path_factory.mktemp("again"), lr=0.1)  # should reproduce `a` exactly
    return {"root": str(root), "a": a, "b": b, "a_again": a_again}


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_report_json_of_a_parent_matches_logged_values(runs, capsys):
    rc, out, err = _run(capsys, "report", runs["root"], "--json")
    assert rc == 0
    payload = json.loads(out)
    assert [r["run"] for r in payload["runs"]] == [runs["a"], runs["b"]]
    assert "reading 1/1" in err  # progress goes to stderr, never into the JSON
    for run in payload["runs"]:
        scalars = read_scalars(run["run"])  # TensorBoard's reader, independently of ours
        live = json.loads(Path(run["run"], HEALTH_JSON).read_text())
        assert live["run"] == run["run"]  # health.json names its run (it used to be null)
        # the ReLU joins the Linear that feeds it, in both reports; types come from health.json
        assert [r["layer"] for r in run["layers"]] == [r["layer"] for r in live["layers"]] == ["net.0", "net.2"]
        assert [r["label"] for r in run["layers"]] == ["net.0 (Linear → ReLU)", "net.2 (Linear)"]
        assert run["layers"][0]["modules"] == ["net.0", "net.1"]
        for row, live_row in zip(run["layers"], live["layers"]):
            for metric in ("grad_norm", "update_ratio", "act_rms", "dead_frac"):
                # the layer's own figure first; the dead fraction is the activation's (the last module)
                modules = row["modules"][::-1] if metric == "dead_frac" else row["modules"]
                series = next((scalars[t] for m in modules if (t := f"watch/{metric}/{m}") in scalars), None)
                expected = None if series is None else sorted(series)[-1][1]
                if expected is None:
                    assert row[metric] is None and live_row[metric] is None
                    continue
                assert row[metric] == pytest.approx(expected)
                assert row[metric] == pytest.approx(live_row[metric], rel=1e-6)  # float32 on disk
            assert row["status"] == live_row["status"]
        live_alerts = [a for a in run["alerts"] if a.get("source") != "offline"]
        assert live_alerts == live["alerts"] and live_alerts  # unshuffled data is flagged
        assert run["checked"] and "re-diagnosed offline" in run["notes"][0]
        assert run["last_step"] == live["last_step"]


def test_report_text_and_markdown(runs, capsys):
    rc, out, _ = _run(capsys, "report", runs["a"], "-q")
    assert rc == 0
    assert out.startswith(f"lightning_watch health report [{runs['a']}]: 2 layers")
    assert "net.0 (Linear → ReLU)" in out and "re-diagnosed offline from the logged statistics" in out
    assert "grad last" in out and "hint: " in out
    rc, out, _ = _run(capsys, "report", runs["a"], "-q", "--markdown")
    assert "| layer |" in out and "`net.0` (Linear → ReLU)" in out


def test_corrupt_event_file_is_named_skipped_and_reading_goes_on(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    good = next(run.glob("events.out.tfevents.*"))
    data = bytearray(good.read_bytes())
    data[60:70] = b"\xff" * 10  # inside the second record: its checksum no longer matches
    bad = run / "events.out.tfevents.0000000001.corrupt"
    bad.write_bytes(bytes(data))
    assert check_event_file(str(bad)) is not None and check_event_file(str(good)) is None
    rc, out, err = _run(capsys, "report", str(run), "--json")
    assert rc == 0
    assert f"skipping corrupt event file {bad}" in err
    payload = json.loads(out)
    assert [s["file"] for s in payload["skipped"]] == [str(bad)]
    assert len(payload["runs"][0]["layers"]) == 2  # the good file was still read


def test_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out, err = _run(capsys, "report", str(tmp_path / "empty"))
    assert rc == 2 and not out
    assert "must hold at least one TensorBoard run" in err and str(tmp_path / "empty") in err
    rc, _, err = _run(capsys, "report", str(tmp_path / "missing"))
    assert rc == 2 and "not a directory" in err


def test_diff_reproduced_run_has_no_divergence(runs, capsys):
    rc, out, _ = _run(capsys, "diff", runs["a"], runs["a_again"], "--json", "-q")
    assert rc == 0
    payload = json.loads(out)
    assert payload["first_divergent_step"] is None and payload["compared_points"] > 100
    assert payload["first_divergence_by_layer"] == []


def test_diff_learning_rate_change_diverges_at_the_first_update(runs, capsys):
    rc, out, _ = _run(capsys, "diff", runs["a"], runs["b"], "--json", "-q")
    assert rc == 0
    payload = json.loads(out)
    # same weights and batch at step 0: gradients and activations agree; only the update differs
    assert payload["first_divergent_step"] == 0
    metrics_at_0 = {legacy_tag(d["tag"]).split("/")[1] for d in payload["at_first_step"]}
    assert metrics_at_0 <= {"update_norm", "update_ratio", "global"}, metrics_at_0
    gap = {legacy_tag(d["tag"]): d for d in payload["at_first_step"]}["watch/update_ratio/net.0"]
    assert gap["a"] == pytest.approx(2 * gap["b"], rel=1e-4)  # plain SGD: update is lr x gradient
    layers = {d["layer"]: d for d in payload["first_divergence_by_layer"]}
    assert layers["net.0"]["step"] == 0 and layers["net.1"]["step"] == 1  # a ReLU only feels it next step
    rc, text, _ = _run(capsys, "diff", runs["a"], runs["b"], "-q")
    assert "first divergent step: 0" in text and "train_loss" in text


def test_diff_needs_one_run_each(runs, capsys):
    rc, _, err = _run(capsys, "diff", runs["root"], runs["a"], "-q")
    assert rc == 2 and "`RUN_A` must be one run directory" in err and "holding 2 runs" in err


def test_python_dash_m_runs_without_the_training_code(runs):
    # a fresh interpreter that never saw TinyRegressor reads the logs back
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_watch", "report", runs["a"], "--json", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["runs"][0]["run"] == runs["a"]


def test_json_and_markdown_together_are_refused(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", runs["a"], "--json", "--markdown"])
    assert exit_info.value.code == 2
    assert "argument --markdown: not allowed with argument --json" in capsys.readouterr().err


def test_help_names_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-watch") and "report LOGDIR" in out and "diff RUN_A RUN_B" in out


def test_running_run_with_a_half_written_record_is_read(runs, tmp_path, capsys):
    run = tmp_path / "running"
    shutil.copytree(runs["a"], run)
    event_file = next(run.glob("events.out.tfevents.*"))
    event_file.write_bytes(event_file.read_bytes()[:-7])  # the writer is mid-record
    assert check_event_file(str(event_file)) is None  # cut short at the end is not corruption
    rc, out, _ = _run(capsys, "report", str(run), "--json", "-q")
    payload = json.loads(out)
    assert rc == 0 and not payload["skipped"] and len(payload["runs"][0]["layers"]) == 2
