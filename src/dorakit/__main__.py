"""``python -m dorakit`` runs the ``dorakit`` command (what torchrun and accelerate launch start with ``-m``)."""

import sys

from .cli import main

sys.exit(main())
