import sys

from competesmoe.launcher.cli import main

sys.exit(main())
