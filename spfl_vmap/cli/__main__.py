"""``python -m spfl_vmap.cli``: the ``spfl`` command."""

import sys

from . import main

sys.exit(main())
