"""``python -m kdlab.report``: the report command line."""

import sys

from kdlab.report import main

sys.exit(main())
