"""The kernel and training-step profiler; the same as the `competesmoe-profile` command."""
from competesmoe.profiling.kernels import main

if __name__ == "__main__":
    raise SystemExit(main())
