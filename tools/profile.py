"""Shim for the kernel profiler, competesmoe.kernels.profile:main. Run as a script, this file's
folder heads sys.path, where its name would shadow the stdlib `profile` that torch imports: drop it."""
import os
import sys

sys.path = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
from competesmoe.kernels.profile import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
