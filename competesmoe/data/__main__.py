"""`python -m competesmoe.data`: the same as the competesmoe-data command."""
import sys

from competesmoe.data.cli import main

sys.exit(main())
