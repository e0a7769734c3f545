"""Which exchange a competing MoE layer uses under expert parallelism: the byte-count cost model.

A competing layer scores every token against all E experts, and the experts sit on the `ep`
ranks of an expert-parallel group. competesmoe.parallel.dispatch runs either of two exchanges:

  tokens   every rank gathers the group's tokens, scores them against its E/ep experts and
           returns the scores to the tokens' ranks; the K winners then travel by the ordinary
           dispatch and combine (all-to-all).
  weights  every rank all-gathers the layer's expert weights (all E experts), scores its own
           tokens against all of them and computes the winners' outputs locally: no token
           moves. The backward reduce-scatters the gathered weights' gradients (summed over the
           group) to their owners.

Bytes one rank sends per competing layer, forward + backward, with T tokens per rank, model
width d, E experts, K winners, expert weights W = E (d h1 + h d) elements (h1 = h, or 2h for
swiglu's gate and up), and a / c / g bytes per element of activations, gathered weights (the
dtype the experts compute in) and gradients (the parameters' dtype):

  tokens   2 (ep-1)/ep T a (ep d + E + 2 K d)    gather (ep-1) T d, score return (ep-1) T E/ep,
                                                  winners' dispatch + combine 2 (ep-1)/ep T K d
                                                  (its expectation under uniform routing); the
                                                  backward mirrors each exchange
  weights  (ep-1)/ep W (c + g)                    all-gather forward, reduce-scatter backward

Scores are counted at the activation width; the two tiny count exchanges are left out. The
factor (ep-1)/ep is common to both, so the weights send fewer bytes exactly when

  T > T* = W (c + g) / (2 a (ep d + E + 2 K d))

The reference LM in bf16 (W = 8.39M, d = 512, E = 64, K = 8) crosses over at T* = 679 tokens
per rank at ep = 8 and 204 at ep = 64; a Mixtral-8x7B-like layer (W = 1.41G) at 28,667 at ep = 8.

`auto` takes the weights when they send fewer bytes and one layer's gathered weights (E experts,
c bytes per element) fit under parallel.competition_weights_max_mb: a competing layer holds them
from its forward to its backward, and up to A_max layers compete in one step. It decides on the
group's mean tokens per rank, which every rank of the group learns from one exchange of token
counts, so all ranks of a group always choose the same exchange.
"""
from __future__ import annotations

from dataclasses import dataclass

from competesmoe.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ExchangeShape:
    """What the byte counts of one competing layer depend on."""

    tokens: float  # tokens per rank (the group's mean)
    d_model: int
    num_experts: int
    top_k: int
    w1_cols: int  # h, or 2h for swiglu
    hidden: int
    ep: int
    act_itemsize: int  # bytes per element of the tokens (and scores)
    weight_itemsize: int  # of the gathered weights (the dtype the experts compute in)
    grad_itemsize: int  # of the reduce-scattered gradients (the parameters' dtype)

    @property
    def expert_weights(self) -> int:
        """Elements of all E experts' weights (w1 and w2)."""
        return self.num_experts * (self.d_model * self.w1_cols + self.hidden * self.d_model)

    @property
    def gathered_bytes(self) -> int:
        """Memory of one layer's gathered weights on every rank."""
        return self.expert_weights * self.weight_itemsize

    def token_phases(self) -> dict[str, float]:
        """Forward bytes one rank sends in each exchange of the token path (backward: the same)."""
        share, T, d, a = (self.ep - 1) / self.ep, self.tokens, self.d_model, self.act_itemsize
        return {
            "token_gather": (self.ep - 1) * T * d * a,
            "score_return": (self.ep - 1) * T * (self.num_experts // self.ep) * a,
            "winner_dispatch": share * T * self.top_k * d * a,
            "winner_combine": share * T * self.top_k * d * a,
        }

    def weight_phases(self) -> dict[str, float]:
        share = (self.ep - 1) / self.ep
        return {"weight_gather_fwd": share * self.expert_weights * self.weight_itemsize,
                "grad_reduce_scatter_bwd": share * self.expert_weights * self.grad_itemsize}

    def token_bytes(self) -> float:
        """Forward + backward bytes one rank sends with the token exchange."""
        return 2 * sum(self.token_phases().values())

    def weight_bytes(self) -> float:
        """Forward + backward bytes one rank sends with the weight exchange."""
        return sum(self.weight_phases().values())

    def crossover_tokens(self) -> float:
        """T* above which the weights send fewer bytes than the tokens."""
        per_token = 2 * self.act_itemsize * (self.ep * self.d_model + self.num_experts + 2 * self.top_k * self.d_model)
        return self.expert_weights * (self.weight_itemsize + self.grad_itemsize) / per_token


@dataclass(frozen=True)
class ExchangePolicy:
    """parallel.competition_exchange and the memory cap that `auto` respects."""

    mode: str = "auto"
    max_gathered_mb: float = 2048.0

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> "ExchangePolicy":
        return cls(cfg.competition_exchange, cfg.competition_weights_max_mb)

    def choose(self, shape: ExchangeShape) -> str:
        if self.mode != "auto":
            return self.mode
        fits = shape.gathered_bytes <= self.max_gathered_mb * 1e6
        return "weights" if fits and shape.weight_bytes() < shape.token_bytes() else "tokens"
