"""The kernel and training-step profiler; the same as the `competesmoe-profile` command."""
from competesmoe.kernels.profile import main

if __name__ == "__main__":
    raise SystemExit(main())
