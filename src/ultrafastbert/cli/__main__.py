"""``python -m ultrafastbert.cli``."""

import sys

from . import main

sys.exit(main())
