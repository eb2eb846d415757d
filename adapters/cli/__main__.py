"""``python -m adapters.cli``: the ``boternity`` command without its console script."""

import sys

from adapters.cli.main import main

sys.exit(main())
