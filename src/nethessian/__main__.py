"""``python -m nethessian``: the command line."""

import sys

from ._app.cli import main

sys.exit(main())
