"""End-to-end: Watch on a tiny run writes all four families, read back with TensorBoard's reader."""

from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader

from lightning_watch import Watch


def test_watch_writes_four_families(tmp_path):
    model = TinyRegressor()
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)])
    trainer.fit(model, regression_loader())
    scalars = read_scalars(trainer.logger.log_dir)
    for family in ("grad_norm", "update_ratio", "act_rms", "dead_frac"):
        assert any(tag.startswith(f"watch/{family}/") for tag in scalars), family
    # logged at Lightning's steps 1 and 3 (every 2nd step of 4)
    assert [s for s, _ in scalars["watch/grad_norm/net.0"]] == [1, 3]
    # no hooks left behind
    assert all(not m._forward_hooks for m in model.modules())
