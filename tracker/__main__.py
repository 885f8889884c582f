"""`python -m tracker` runs the command line."""

from __future__ import annotations

import sys

from tracker.cli import main

sys.exit(main())
