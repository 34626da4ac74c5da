"""LightningCLI: every callback configured from YAML (``trainer.callbacks`` with class_path/init_args).

The CLI runs in this process through ``examples/cli_train.py``'s ``main(args=...)`` so that the
built callbacks can be inspected, then fits for a few steps on the example's synthetic data.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import read_scalars
from torch import nn

from lightning_watch import (
    ActivationScaleMonitor,
    ActivityRegularizer,
    DeadUnitMonitor,
    EarlyAlerts,
    GradientNormMonitor,
    ParameterDeltaMonitor,
    Watch,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


#: steps per CLI run: callbacks that follow the Trainer write every 10 steps at least (cadence floor)
STEPS = 10


@pytest.fixture(scope="module")
def cli_train():
    spec = importlib.util.spec_from_file_location("cli_train", EXAMPLES / "cli_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(cli_train, config: Path, root: Path, *extra: str):
    args = [
        "fit",
        f"--config={config}",
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli_train.main(args=args)


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_example_config_runs_through_example_script(cli_train, tmp_path):
    cli = run_cli(cli_train, EXAMPLES / "cli_config.yaml", tmp_path, f"--trainer.logger.init_args.save_dir={tmp_path}")
    callbacks = cli.trainer.callbacks
    watch = next(c for c in callbacks if isinstance(c, Watch))
    reg = next(c for c in callbacks if isinstance(c, ActivityRegularizer))
    # nested class_path/init_args reached each bundled monitor and the alerts
    grads = watch.monitor(GradientNormMonitor)
    acts = watch.monitor(ActivationScaleMonitor)
    dead = watch.monitor(DeadUnitMonitor)
    assert grads.per_parameter is True
    assert acts._selection.types == (nn.Linear, nn.Tanh, nn.ReLU) and acts.saturation_margin == 0.02
    assert dead._selection.include == ("encoder.*",) and dead._selection.exclude == ("encoder.3",)
    assert isinstance(watch.early_alerts, EarlyAlerts)
    assert watch.early_alerts.actions == {"non_finite_loss": "stop"}
    assert watch.early_alerts.settings["dead_units"]["threshold"] == 0.5
    assert [r.name for r in reg.rules] == ["encoder.2"]
    assert cli.trainer.global_step == STEPS
    # and the fit wrote what the configuration asked for
    tags = set(read_scalars(tmp_path / "tb"))
    assert "watch/grad_norm/encoder.0.weight" in tags  # per_parameter
    assert "watch/act_saturated_frac/encoder.3" in tags  # Tanh, selected by a type name
    assert "watch/dead_frac/encoder.1" in tags and "watch/dead_frac/encoder.3" not in tags
    assert "watch/dead_frac/head" not in tags  # outside the include glob
    assert any(t.startswith("watch/activity_penalty") or "activity" in t for t in tags), sorted(tags)


def test_every_callback_standalone_from_yaml(cli_train, tmp_path):
    config = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_watch.GradientNormMonitor",
                    "init_args": {"include": "encoder.*", "types": ["Linear"], "log_every_n_steps": 1},
                },
                {
                    "class_path": "lightning_watch.ParameterDeltaMonitor",
                    "init_args": {"include": ["encoder.0", "head"], "exclude": "head"},
                },
                {
                    "class_path": "lightning_watch.ActivationScaleMonitor",
                    "init_args": {"types": ["torch.nn.Tanh", "ReLU"], "validation": True},
                },
                {"class_path": "lightning_watch.DeadUnitMonitor", "init_args": {"sample_every_n_steps": 1}},
            ],
        }
    }
    cli = run_cli(cli_train, write_yaml(tmp_path / "config.yaml", config), tmp_path, "--trainer.val_check_interval=2")
    by_type = {type(c): c for c in cli.trainer.callbacks}
    grads, deltas, acts = by_type[GradientNormMonitor], by_type[ParameterDeltaMonitor], by_type[ActivationScaleMonitor]
    assert grads._selection.include == ("encoder.*",) and grads._selection.types == (nn.Linear,)
    # `include` and `types` select by union: the encoder's modules plus every Linear (the head)
    assert grads.module_names == ["encoder.0", "encoder.1", "encoder.2", "encoder.3", "head"]
    assert deltas._selection.include == ("encoder.0", "head") and deltas._selection.exclude == ("head",)
    assert acts._selection.types == (nn.Tanh, nn.ReLU) and acts.validation is True
    assert by_type[DeadUnitMonitor]._sample_every_n_steps == 1
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["watch/grad_norm/encoder.0"]] == list(range(STEPS))  # its own cadence
    assert "watch/grad_norm/head" in scalars and "watch/grad_norm/encoder.1" not in scalars  # no parameters
    assert "watch/update_ratio/encoder.0" in scalars and "watch/update_ratio/head" not in scalars
    assert [s for s, _ in scalars["watch/val_act_rms/encoder.3"]] == list(
        range(1, STEPS, 2)
    )  # validation=True, every 2 steps


def test_early_alerts_and_regularizer_standalone_from_yaml(cli_train, tmp_path):
    # (EarlyAlerts alone builds a private Watch that writes the watch/* scalars: it is not
    # combined with standalone monitors, whose tags it would write a second time)
    config = {
        "trainer": {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path), "name": "tb"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_watch.EarlyAlerts",
                    "init_args": {
                        "actions": {"exploding_gradients": "stop"},
                        "settings": {"dead_units": {"threshold": 0.9}, "loss_plateau": False},
                        "log_every_n_steps": 1,
                    },
                },
                {
                    "class_path": "lightning_watch.ActivityRegularizer",
                    "init_args": {"rules": {"encoder.1": {"l1": 1e-4}}, "log_every_n_steps": 2},
                },
            ],
        }
    }
    cli = run_cli(cli_train, write_yaml(tmp_path / "config.yaml", config), tmp_path)
    by_type = {type(c): c for c in cli.trainer.callbacks}
    alerts, reg = by_type[EarlyAlerts], by_type[ActivityRegularizer]
    assert alerts.actions == {"exploding_gradients": "stop"}
    assert alerts.settings["dead_units"]["threshold"] == 0.9 and "loss_plateau" in alerts.disabled
    assert [r.name for r in reg.rules] == ["encoder.1"]
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["watch/global/loss"]] == list(range(STEPS))  # the private Watch's cadence


def test_bad_value_in_yaml_fails_with_the_callbacks_message(cli_train, tmp_path, capsys):
    config = {
        "trainer": {
            "callbacks": [{"class_path": "lightning_watch.DeadUnitMonitor", "init_args": {"types": ["NoSuchLayer"]}}]
        }
    }
    path = write_yaml(tmp_path / "config.yaml", config)
    with pytest.raises((ValueError, SystemExit)) as info:
        run_cli(cli_train, path, tmp_path)
    said = str(info.value) + capsys.readouterr().err
    assert "`types` entry 'NoSuchLayer' is not a class in torch.nn" in said, said
