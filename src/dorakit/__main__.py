"""``python -m dorakit`` runs the ``dorakit`` command (what torchrun and accelerate launch start with ``-m``)."""

import sys

from .commands.cli import main

sys.exit(main())
