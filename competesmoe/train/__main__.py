import sys

from competesmoe.train.cli import main

sys.exit(main())
