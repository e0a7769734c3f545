"""What an expert is, for the model and the kernels alike (imports nothing, not even Triton).

Expert i is `act(x W1_i) W2_i`; W1 has `w1_columns(hidden, act)` columns: for swiglu the gate
columns, then the up columns.
"""

ACTIVATIONS = ("relu", "gelu", "silu", "swiglu")


def w1_columns(hidden: int, activation: str) -> int:
    """Columns of W1: swiglu needs a gate and an up projection."""
    return 2 * hidden if activation == "swiglu" else hidden


def expert_flops_per_token(d: int, hidden: int, activation: str) -> int:
    """Forward matmul FLOPs of one expert on one token."""
    return 2 * d * w1_columns(hidden, activation) + 2 * hidden * d
