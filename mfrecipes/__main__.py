"""``python -m mfrecipes`` is the ``mfr`` command."""
import sys

from mfrecipes.cli import main

sys.exit(main())
