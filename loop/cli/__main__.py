"""`python -m loop.cli ...` is the same as the `loop` console script."""

import sys

from loop.cli import main

sys.exit(main())
