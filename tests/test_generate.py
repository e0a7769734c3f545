"""Generation: the KV cache against the full forward, padded batches against prompts alone, greedy
decoding against a hand loop, sampling, and competesmoe-generate on a trained checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from competesmoe.config import load_config
from competesmoe.eval.generate_cli import main as generate_main
from competesmoe.model.config import ROUTERS, ModelConfig, MoEConfig
from competesmoe.model.generate import Sampling, generate, top_p_filter
from competesmoe.model.kv_cache import KVCache
from competesmoe.model.transformer import Transformer
from competesmoe.train.trainer import train

from runs import overrides

VOCAB = 61


def model_of(router: str, **extra) -> Transformer:
    """A random float64 model in eval mode; odd sizes and partial RoPE on purpose."""
    torch.manual_seed(0)
    activation = "gelu" if router == "dense" else "swiglu"
    cfg = ModelConfig(vocab_size=VOCAB, d_model=24, n_layers=3, n_heads=2, head_dim=10, rope_fraction=0.5,
                      moe=MoEConfig(router=router, num_experts=5, top_k=2, expert_hidden=6, activation=activation),
                      **extra)
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_decoding_equals_the_full_forward(router):
    model = model_of(router, moe_every=2 if router == "smoe" else 1)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache(len(model.blocks), capacity=17)
        # a prompt of 6, one token at a time, then a chunk of 4 after the cache, then the rest
        pieces = [tokens[:, :6]] + [tokens[:, i:i + 1] for i in range(6, 9)] + [tokens[:, 9:13], tokens[:, 13:]]
        incremental = torch.cat([model(p, cache=cache).logits for p in pieces], dim=1)
    assert cache.length == 17
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("router", ["competesmoe", "xmoe", "dense"])
def test_left_padded_prompts_equal_each_prompt_alone(router):
    model = model_of(router)
    prompts = [[1, 7, 8], [1, 9, 10, 11, 12, 13, 14], [1, 20, 21, 22, 23]]
    width = max(map(len, prompts))
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([[True] * (width - len(p)) + [False] * len(p) for p in prompts])
    with torch.no_grad():
        cache = KVCache(len(model.blocks), width + 2, pad)
        batch_prompt = model(tokens, cache=cache).logits
        batch_next = model(torch.tensor([[5], [6], [7]]), cache=cache).logits
        for row, (prompt, nxt) in enumerate(zip(prompts, (5, 6, 7))):
            alone = model(torch.tensor([prompt + [nxt]])).logits[0]
            torch.testing.assert_close(batch_prompt[row, width - len(prompt):], alone[:-1], rtol=0, atol=1e-12)
            torch.testing.assert_close(batch_next[row, 0], alone[-1], rtol=0, atol=1e-12)


def hand_greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Argmax of a full forward over the whole sequence, one token at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("router", ["smoe", "competesmoe", "sharede_v3"])
def test_greedy_equals_a_hand_loop_with_and_without_cache(router):
    model = model_of(router)
    prompts = [[1, 7, 8], [1, 9, 10, 11, 12, 13, 14], [1]]
    eos = hand_greedy(model, prompts[0], 12, eos=-1)[4]  # a token the first row reaches: it stops there
    expected = [hand_greedy(model, p, 12, eos) for p in prompts]
    assert len(expected[0]) <= 4
    assert generate(model, prompts, 12, eos_id=eos) == expected
    assert generate(model, prompts, 12, eos_id=eos, use_cache=False) == expected


def test_with_the_cache_each_step_reads_one_token_per_prompt(monkeypatch):
    """The cost of a new token does not depend on the prompt: after the prompt's one forward,
    every step runs the model on one position per row (and the attention over the cache)."""
    model = model_of("competesmoe")
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, **kw: widths.append(tokens.shape) or forward(tokens, **kw))
    generate(model, [[1] * 30, [1] * 9], 6)
    assert widths == [(2, 30)] + [(2, 1)] * 5  # the 6th token needs no forward after it
    widths.clear()
    generate(model, [[1] * 30, [1] * 9], 6, use_cache=False)
    assert widths == [(2, 30 + i) for i in range(6)]


def test_generation_stops_at_eos_per_row_and_can_ignore_it():
    model = model_of("smoe")
    prompts = [[1, 7, 8], [1, 9]]
    free = generate(model, prompts, 10)
    assert all(len(row) == 10 for row in free)
    eos = free[0][2]
    stopped = generate(model, prompts, 10, eos_id=eos)
    for row, tokens in zip(stopped, free):
        assert row == (tokens[:tokens.index(eos)] if eos in tokens else tokens)
    assert len(stopped[0]) <= 2


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.97, 0.01, 0.01, 0.01]])
    kept = top_p_filter(probs, 0.7)  # 0.5 + 0.25 = 0.75 >= 0.7: two tokens; row 2: the first alone
    assert torch.equal(kept > 0, torch.tensor([[False, True, False, True], [True, False, False, False]]))
    torch.testing.assert_close(kept[kept > 0], probs[kept > 0])
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_sampling_is_seeded_and_follows_temperature_and_top_p():
    model = model_of("competesmoe")
    prompts = [[1, 7, 8], [1, 9, 10, 11]]
    hot = Sampling(temperature=1.5, top_p=1.0, seed=3)
    first = generate(model, prompts, 15, sampling=hot)
    assert generate(model, prompts, 15, sampling=hot) == first
    assert generate(model, prompts, 15, sampling=Sampling(1.5, 1.0, seed=4)) != first
    # the cache changes nothing in what is drawn
    assert generate(model, prompts, 15, sampling=hot, use_cache=False) == first
    # a nucleus this small leaves the argmax only: greedy
    assert generate(model, prompts, 15, sampling=Sampling(1.0, 1e-6, seed=5)) == generate(model, prompts, 15)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    train(load_config(None, overrides(corpus, out / "run", out / "cache", **{"train.steps": 10})))
    return out / "run"


def test_cli_generates_greedy_and_sampled_batches(tiny_run, capsys):
    from competesmoe.train.checkpoint import load_for_inference

    assert generate_main([str(tiny_run), "--prompt", "The Congress", "--prompt", "We", "--max-new-tokens", "6",
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    _, model, tokenizer = load_for_inference(tiny_run)
    for prompt in ("The Congress", "We"):
        ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
        assert prompt + tokenizer.decode(hand_greedy(model, ids, 6, tokenizer.eos_id)) in out
    assert out.count("--- sample") == 2 and "greedy" in out

    argv = [str(tiny_run), "--prompt", "The", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9",
            "--seed", "7", "--device", "cpu"]
    assert generate_main(argv) == 0
    sampled = capsys.readouterr().out.split("--- sample 1\n")[1]
    assert generate_main(argv) == 0
    assert capsys.readouterr().out.split("--- sample 1\n")[1] == sampled


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    ([], "no prompt given"),
    (["--prompt-file", "/no/such/file"], "--prompt-file"),
])
def test_cli_bad_input_is_one_error_line(tiny_run, capsys, argv, message):
    assert generate_main([str(tiny_run)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_missing_checkpoint_and_torchrun_are_explained(tmp_path, capsys, monkeypatch):
    assert generate_main([str(tmp_path), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert generate_main([str(tmp_path), "--prompt", "x"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_console_script_is_installed(tiny_run):
    script = os.path.join(os.path.dirname(sys.executable), "competesmoe-generate")
    result = subprocess.run([script, str(tiny_run), "--prompt", "The", "--max-new-tokens", "3", "--device", "cpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--- sample 1\nThe" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_gpu_equals_cpu():
    model = model_of("competesmoe")
    model.cfg.moe.backend = "torch"  # float64 here; the kernels are tested on their own
    prompts = [[1, 7, 8], [1, 9, 10, 11, 12, 13, 14]]
    expected = generate(model, prompts, 12)
    sampled = generate(model, prompts, 12, sampling=Sampling(1.0, 0.9, seed=1))
    model.cuda()
    assert generate(model, prompts, 12) == expected
    assert generate(model, prompts, 12, use_cache=False) == expected
    assert len(generate(model, prompts, 12, sampling=Sampling(1.0, 0.9, seed=1))) == len(sampled)
