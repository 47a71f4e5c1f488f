"""``python -m whymatch.cli ARGS`` (and ``torchrun -m whymatch.cli ARGS``): the `whymatch` command."""

import sys

from . import main

sys.exit(main())
