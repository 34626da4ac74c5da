"""The C checksum for TensorBoard's event records: the same bytes as TensorBoard's own, read back intact."""

from __future__ import annotations

import os

import pytest
from helpers import TinyRegressor, make_trainer, read_scalars, regression_loader
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from lightning_watch import Watch, fast_crc

crc32c = pytest.importorskip("crc32c")


@pytest.mark.parametrize("size", [0, 1, 3, 4, 7, 8, 15, 64, 1000, 4099])
def test_masked_c_checksum_equals_tensorboards_pure_python_one(size):
    data = os.urandom(size)
    assert fast_crc.masked(crc32c.crc32c)(data) == pywrap_tensorflow.masked_crc32c(data)


def test_a_watched_run_uses_it_and_tensorboards_checking_reader_reads_every_point(tmp_path):
    trainer = make_trainer(tmp_path, [Watch(log_every_n_steps=2)], max_steps=6)
    trainer.fit(TinyRegressor(), regression_loader())
    assert record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c  # the C one is in use
    # TensorBoard's reader recomputes every record's checksum with its own pure-Python function and
    # raises DataLossError on a mismatch: every logging step's points coming back proves the bytes
    scalars = read_scalars(trainer.logger.log_dir, raw=True)
    grad_tags = [tag for tag in scalars if tag.startswith("watch.grad_norm/")]
    logging_steps = list(range(1, trainer.global_step, 2))
    assert len(logging_steps) >= 2
    assert grad_tags and all([step for step, _ in scalars[tag]] == logging_steps for tag in grad_tags)
