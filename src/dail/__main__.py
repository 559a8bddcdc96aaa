"""`python -m dail` (and `accelerate launch -m dail`) runs the command-line tool."""

import sys

from dail.cli import main

sys.exit(main())
