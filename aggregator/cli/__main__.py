"""``python -m aggregator.cli``: the ``gateway`` command."""

import sys

from aggregator.cli.main import main

sys.exit(main())
