"""``python -m dlm_decode``: the ``dlm-decode`` command line."""

import sys

from dlm_decode.cli import main

sys.exit(main())
