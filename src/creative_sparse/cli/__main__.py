"""``python -m creative_sparse.cli``: the ``creative-sparse`` command."""

import sys

from . import main

sys.exit(main())
