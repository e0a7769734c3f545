"""Our checkpoints as a model of EleutherAI's lm-evaluation-harness (`pip install 'competesmoe[lmeval]'`).

    import lm_eval
    from competesmoe.eval.lm_eval_adapter import CompeteSMoELM

    lm = CompeteSMoELM(path="runs/smoke", device="cuda", batch_size=32)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "lambada_openai"])

Importing this module does not import lm_eval: `CompeteSMoELM` is built on first access, as a
subclass of `lm_eval.api.model.LM` (and registered as lm-eval model "competesmoe"); without
lm-eval installed that access raises an ImportError saying how to install it. The request
handling lives in `AdapterMethods`, which `adapter_class(base)` mixes into any base class.

Scoring is competesmoe.eval.scoring's (EOS before every sequence, continuation tokens read off the
encoding of the whole text, rolling windows of the trained seq_len). Generation is greedy. The
adapter runs in one process: lm-eval's own data parallelism is not wired to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from competesmoe.eval.scoring import Scorer

_INSTALL = "lm-eval is not installed: pip install 'competesmoe[lmeval]' (or pip install lm-eval)"


class AdapterMethods:
    """lm-eval's LM interface over a competesmoe model and tokenizer."""

    def __init__(self, path: Optional[str | Path] = None, device: str = "cpu", batch_size: int = 32,
                 max_gen_toks: int = 256, model: Optional[torch.nn.Module] = None, tokenizer=None,
                 seq_len: Optional[int] = None):
        """Either `path` (a run or checkpoint directory) or `model`, `tokenizer` and `seq_len`.
        lm-eval passes constructor arguments as strings (`--model_args batch_size=16`)."""
        super().__init__()
        if path is not None:
            from competesmoe.train.checkpoint import load_for_inference

            cfg, model, tokenizer = load_for_inference(Path(path), device)
            seq_len = seq_len or cfg.train.seq_len
        if model is None or tokenizer is None or seq_len is None:
            raise ValueError("give a checkpoint `path`, or a `model`, its `tokenizer` "
                             "and the `seq_len` it was trained with")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(model, tokenizer, int(seq_len), int(batch_size))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request.args = (context, continuation)."""
        scores = self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests], "lm-eval loglikelihood")
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request.args = (text,), every token scored once."""
        return [s.logprob for s in self.scorer.rolling([r.args[0] for r in requests], "lm-eval rolling")]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each request.args = (context, {"until": ..., "max_gen_toks": ...})."""
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = kwargs.get("until") or []
            out.append(self.greedy(context, [until] if isinstance(until, str) else list(until),
                                   int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        return out

    @torch.no_grad()
    def greedy(self, context: str, until: list[str], max_tokens: int) -> str:
        """Argmax decoding from context, cut before the first stop string; EOS also stops."""
        device = next(self.model.parameters()).device
        ids = [self.tokenizer.eos_id] + self.tokenizer.encode(context)
        generated: list[int] = []
        text = ""
        for _ in range(max_tokens):
            window = torch.tensor([ids[-self.scorer.seq_len:]], device=device)
            token = int(self.model(window).logits[0, -1].argmax())
            if token == self.tokenizer.eos_id:
                break
            ids.append(token)
            generated.append(token)
            text = self.tokenizer.decode(generated)
            stops = [text.find(s) for s in until if s and s in text]
            if stops:
                return text[:min(stops)]
        return text


def adapter_class(base: type) -> type:
    """The adapter as a subclass of `base` (lm-eval's LM, or a stand-in in tests)."""
    return type("CompeteSMoELM", (AdapterMethods, base), {"__module__": __name__, "__doc__": AdapterMethods.__doc__})


def _lm_eval_class() -> type:
    try:
        # lm-eval registers its own models (hf, vllm, ...) lazily, only while its registry is
        # empty: load them first, or registering ours would hide them for the rest of the process.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as err:
        raise ImportError(f"{_INSTALL} ({err})") from None
    return register_model("competesmoe")(adapter_class(LM))


_built: dict[str, type] = {}


def __getattr__(name: str):
    if name == "CompeteSMoELM":
        if name not in _built:
            _built[name] = _lm_eval_class()
        return _built[name]
    raise AttributeError(f"module {__name__} has no attribute {name}")
