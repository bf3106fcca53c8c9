"""``python -m mammorg``: the command line (for launchers: ``torchrun -m mammorg stage2 train ...``)."""

import sys

from mammorg.app.cli import main

sys.exit(main())
