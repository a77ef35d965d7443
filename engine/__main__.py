"""`python -m tunewiz.engine` is the `tunewiz` command."""

import sys

from tunewiz.engine.cli.main import main

sys.exit(main())
