"""``python -m inturn``: the same as the ``inturn`` command."""

import sys

from ._cli import main

sys.exit(main())
