"""A fault benchmark for ``Watch()``: base setups, DeepCrime-style mutation operators, outcome ground truth.

``setups`` builds the four tiny base trainings from a plain config dict, ``operators`` lists the faults
as edits of that config, ``runner`` trains one (setup, operator, seed) in a forked process, and
``score`` turns the runs into the ground truth (killed/alive, by validation accuracy, without
lightning_watch) and the scores of the default ``Watch()``. ``benchmarks/diagnosis.py`` is the CLI.
"""
