"""Fault benchmark of the default ``Watch()``: DeepCrime-style mutants of four tiny setups.

Ground truth by outcome, without lightning_watch: a mutant is *killed* when its mean validation
accuracy over the seeds is below the original's by more than max(0.05, 3 sigma of the original's
seeds) or it produces NaN. Then each (setup, operator, seed) is trained again with
``Trainer(callbacks=[Watch()])`` in a fresh (forked) process and scored: recall on killed mutants,
cause recall, false alarms on the originals, alarms on alive mutants, first-alert step, crashes, and
whether the watched run trained exactly like the unwatched one.

    PYTHONPATH=$PWD python benchmarks/diagnosis.py --jobs 2          # full run
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --quick           # CI subset, < 60 s
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --setups lstm --operators HLR_x100,WCI --seeds 0,1,2
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --healthy          # healthy example programs, ~6 min
    PYTHONPATH=$PWD python benchmarks/diagnosis.py --real             # healthy Hugging Face models, ~4 min
"""

from __future__ import annotations

import os
import sys

# this script's directory holds the `diagnosis` package (which takes precedence over this file on import)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diagnosis.cli import main

if __name__ == "__main__":
    main()
