"""Profiling: the Triton kernels against the pure-torch backend (kernels.py, `competesmoe-profile`)
and whole training steps against the FLOP model (steps.py, `competesmoe-profile --steps`)."""
