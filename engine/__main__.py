"""`python -m engine` is the `tunewiz` command."""

import sys

from engine.cli import main

sys.exit(main())
