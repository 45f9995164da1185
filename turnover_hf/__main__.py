"""``python -m turnover_hf``: the ``turnover-hf`` command line (see :mod:`turnover_hf.cli`)."""

import sys

from .cli import main

sys.exit(main())
