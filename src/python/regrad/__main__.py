"""`python -m regrad ...` runs the `regrad` console script."""

import sys

from .cli import main

sys.exit(main())
