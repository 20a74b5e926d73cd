"""``python -m stepdrop.cli``."""

import sys

from stepdrop.cli import main

sys.exit(main())
