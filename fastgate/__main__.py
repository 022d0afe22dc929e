"""`python -m fastgate` — the same as the `fastgate` command."""

import sys

from fastgate.cli import main

sys.exit(main())
