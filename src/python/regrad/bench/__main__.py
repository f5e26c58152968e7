"""`python -m regrad.bench ...` runs `regrad bench`."""

import sys

from . import main

sys.exit(main())
