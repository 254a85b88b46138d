"""`python -m ldm.evaluate --help`: see ldm/evaluate/cli.py."""

import sys

from ldm.evaluate.cli import main

sys.exit(main())
