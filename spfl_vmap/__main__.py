"""``python -m spfl_vmap``: the ``spfl`` command."""

import sys

from .cli import main

sys.exit(main())
