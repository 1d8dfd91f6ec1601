"""``python -m cambackdoor.cli``: the same as the ``cambackdoor`` command."""

import sys

from cambackdoor.cli import main

sys.exit(main())
