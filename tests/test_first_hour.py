"""The first hour of a new user: each alert said once, hints that install, examples that end by
saying where to look, a health number for the progress bar, and near-miss names corrected."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyRegressor, make_trainer, regression_loader
from torch import nn

from lightning_watch import Watch, WatchWarning
from lightning_watch.alerts import AlertWarning
from lightning_watch.alerts.alert import Alert
from lightning_watch.selection import resolve_type
from lightning_watch.warn import warn_once
from lightning_watch.writers import PROGRESS_KEY, progress_bar_metrics

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _dead_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
        net[2].bias.fill_(-100.0)
    return net


# ---------------------------------------------------------------- each alert said once
def test_each_alert_is_printed_once_and_attributed_to_the_users_script(tmp_path):
    # a user's script, run as the user runs it: stderr is what they read
    script = tmp_path / "my_train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "tests")!r})
            import torch
            from helpers import TinyRegressor, make_trainer, regression_loader
            from test_first_hour import _dead_net
            from lightning_watch import Watch
            torch.manual_seed(0)
            watch = Watch(log_every_n_steps=2)
            trainer = make_trainer(__import__("pathlib").Path({str(tmp_path)!r}), [watch], max_steps=6)
            trainer.fit(TinyRegressor(net=_dead_net()), regression_loader())  # FIT-LINE
            for alert in watch.alerts:
                print("RAISED", alert.code, alert.module, alert.severity)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": ""}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    raised = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RAISED")]
    warned = {(code, module) for code, module, severity in raised if severity != "info"}
    assert ("dead_units", "net.0") in warned or ("dead_units", "net.1") in warned, raised
    fit_line = next(i for i, line in enumerate(script.read_text().splitlines(), 1) if "FIT-LINE" in line)
    for code, module in warned:
        where = "" if module == "None" else f" in {module}"
        said = [line for line in done.stderr.splitlines() if f"] {code}{where} at step" in line]
        assert len(said) == 1, (code, module, said)  # once: not by logging and by warnings
        assert said[0].startswith(f"{script}:{fit_line}: AlertWarning:"), said[0]  # the user's line
    assert "lightning_watch/alerts/" not in done.stderr  # never attributed to our files


def test_the_alert_warning_points_at_the_fit_call(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_steps=6)
    with pytest.warns(AlertWarning) as record:
        trainer.fit(TinyRegressor(net=_dead_net()), regression_loader())
    assert {Path(w.filename).resolve() for w in record if issubclass(w.category, AlertWarning)} == {
        Path(__file__).resolve()
    }


def test_watch_warning_is_said_on_rank_zero_only(monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_once("first-hour-rank", "odd module on rank 1")
    assert caught == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    with pytest.warns(WatchWarning, match="odd module on rank 0") as record:
        warn_once("first-hour-rank-0", "odd module on rank 0")
    assert Path(record[0].filename).resolve() == Path(__file__).resolve()  # this line, not warn.py


# ---------------------------------------------------------------- the progress bar's health number
def _alert(severity: str, code: str = "dead_units", module: str | None = "fc") -> Alert:
    return Alert(code, severity, 1, 0, module, 0.9, 0.7, "m", "h")


def test_progress_bar_metrics_count_warnings_and_errors_not_infos():
    assert progress_bar_metrics([]) == {PROGRESS_KEY: 0.0}
    alerts = [_alert("warning"), _alert("info", "unseeded_run", None), _alert("error", "non_finite_loss", None)]
    assert progress_bar_metrics(alerts) == {PROGRESS_KEY: 2.0}
    assert all(isinstance(v, float) for v in progress_bar_metrics(alerts).values())


def test_progress_bar_metrics_reach_lightnings_progress_bar(tmp_path):
    # the wiring the lead puts into Watch: log the number with prog_bar=True, logger=False
    watch = Watch(log_every_n_steps=2)

    class HealthLine(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log_dict(progress_bar_metrics(watch.alerts), prog_bar=True, logger=False)

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [watch, HealthLine()], max_steps=6)
    trainer.fit(TinyRegressor(net=_dead_net()), regression_loader())
    warned = sum(a.severity != "info" for a in watch.alerts)
    assert warned >= 1
    assert float(trainer.progress_bar_metrics[PROGRESS_KEY]) == warned


# ---------------------------------------------------------------- small things
@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [("Conv2D", "'Conv2d'"), ("relu", "'ReLU'"), ("Lienar", "'Linear'"), ("torch.nn.Conv2D", "'torch.nn.Conv2d'")],
)
def test_a_near_miss_type_name_gets_did_you_mean(spec, suggestion):
    with pytest.raises(ValueError, match=rf"`types` entry '{spec}' .*\(did you mean {suggestion}\?\)"):
        resolve_type(spec)
    with pytest.raises(ValueError, match=r"did you mean 'Conv2d'"):
        Watch(types=["Conv2D"])


def test_an_unknown_type_name_gets_no_wrong_suggestion():
    with pytest.raises(ValueError) as err:
        resolve_type("Quux")
    assert "did you mean" not in str(err.value)


def test_the_matplotlib_hint_installs(monkeypatch):
    from lightning_watch.views import images
    from lightning_watch.views.history import History

    monkeypatch.setattr(images, "matplotlib_available", lambda: False)
    with pytest.warns(WatchWarning) as record:
        assert images.render_pictures(History()) == {}
    text = str(record[0].message)
    assert "pip install matplotlib" in text and "lightning-watch[" not in text  # the package is on no index


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    local = {p.stem for p in EXAMPLES.glob("*.py")} | {"lightning_watch", "__future__"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def test_the_examples_extra_installs_what_every_example_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    provided = {"torch", "lightning", "torchmetrics", "tensorboard", "yaml"}  # core dependencies (yaml: Lightning's)
    extra = project["optional-dependencies"]["examples"]
    dist_of = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
    wanted = {dist_of.get(n, n) for p in EXAMPLES.glob("*.py") for n in _third_party_imports(p) - provided}
    names = {req.split("[")[0].split(">")[0].split("=")[0].strip() for req in extra}
    assert wanted <= names, wanted - names
    assert "matplotlib" in names  # pictures are step 1's point
    assert any(req.startswith("jsonargparse[signatures]") for req in extra)  # cli_train.py needs LightningCLI


def test_every_example_ends_by_saying_where_to_look_next():
    scripts = [p for p in EXAMPLES.glob("*.py") if p.stem != "next_steps"]
    assert {p.stem for p in scripts} >= {"digits_mlp", "dying_relu", "activity_regularization", "cli_train"}
    for script in scripts:
        text = script.read_text()
        assert "print_next_steps(" in text, script.name
        assert "lightning-watch report" in text and "tensorboard --logdir" in text, script.name


def test_dying_relu_prints_its_reports_and_where_to_look(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import dying_relu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dying_relu.main(["--epochs", "1", "--logdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("lightning_watch health report") == 2, out[-2000:]  # both runs print theirs, progress bar or not
    assert f"tensorboard --logdir {tmp_path / 'dying_relu'}" in out
    assert f"lightning-watch report {tmp_path / 'dying_relu'}" in out
