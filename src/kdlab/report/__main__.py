"""``python -m kdlab.report``: the report command line."""

import sys

from kdlab.report.cli import main

sys.exit(main())
