"""``python -m ckptmigrate``: the same command line as the ``ckptmigrate`` script."""

import sys

from .cli import main

sys.exit(main())
