"""``python -m dsml.cli``: the ``dsml`` command."""

import sys

from .main import main

sys.exit(main())
