"""``python -m lightning_act`` is the ``lightning_act`` command."""

import sys

from lightning_act.cli import main

sys.exit(main())
