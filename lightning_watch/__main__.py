"""``python -m lightning_watch``: the ``lightning-watch`` command line."""

import sys

from lightning_watch.command import main

sys.exit(main())
