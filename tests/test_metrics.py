"""The evaluation harness on oracle models of known perplexity and on the tiny random Llama."""

import math

import pytest
import torch

from edgellm.measure import MeasureError, decode_tokens_per_s
from edgellm.metrics import (
    EvalError,
    bits_per_byte,
    kl_divergence,
    mean_stderr,
    perplexity,
    token_byte_lengths,
    token_logprobs,
    windows,
)


class Oracle(torch.nn.Module):
    """Predicts the same next-token distribution ``probs`` at every position."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.as_tensor(probs, dtype=torch.float32))

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.logits.expand(*ids.shape, -1).clone()


def test_oracle_perplexity_is_known():
    # p(token 1) = 1/4 everywhere: every scored token costs log 4 nats, so PPL = 4 exactly
    model = Oracle([0.5, 0.25, 0.125, 0.125])
    res = perplexity(model, torch.ones(1000, dtype=torch.long), "gptq", ctx=100, progress=False)
    assert res["ppl"] == pytest.approx(4.0, rel=1e-6)
    assert res["ppl_stderr"] == pytest.approx(0.0, abs=1e-9)
    # PPL = e^H (nats) = 2^H (bits)
    assert 2 ** (res["nll"] / math.log(2)) == pytest.approx(res["ppl"], rel=1e-9)


def test_oracle_mixed_tokens_perplexity():
    model = Oracle([0.5, 0.25, 0.125, 0.125])
    tokens = torch.tensor([0, 1, 2, 3] * 50)  # scored targets: a known mix
    res = perplexity(model, tokens, "gptq", ctx=200, progress=False)
    targets = tokens[1:]
    want = math.exp(-torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))[targets].mean().item())
    assert res["ppl"] == pytest.approx(want, rel=1e-6)
    assert res["n_tokens"] == 199


def test_uniform_logits_give_vocab_size():
    V = 37
    model = Oracle(torch.full((V,), 1.0 / V))
    tokens = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(0))
    for protocol in ("gptq", "sliding", "llamacpp"):
        res = perplexity(model, tokens, protocol, ctx=50, progress=False)
        assert res["ppl"] == pytest.approx(V, rel=1e-5), protocol


@pytest.mark.parametrize("protocol,ctx,stride,chunks,want_windows,want_tokens", [
    ("gptq", 100, None, None, 10, 10 * 99),
    ("gptq", 128, None, None, 7, 7 * 127),  # the 1000 - 896 leftover tokens are not scored
    ("llamacpp", 100, None, None, 10, 10 * (100 - 1 - 50)),
    ("llamacpp", 512, None, None, 1, 0),  # needs 2·ctx tokens: see the error test
    ("sliding", 100, 50, None, 19, 999),  # every token after the first, once
    ("sliding", 100, 100, None, 10, 10 * 99),  # stride = ctx: each window's first token is lost
    ("gptq", 100, None, 3, 3, 3 * 99),
    ("llamacpp", 64, None, 4, 4, 4 * 31),
])
def test_exact_scored_tokens(protocol, ctx, stride, chunks, want_windows, want_tokens):
    if protocol == "llamacpp" and 1000 < 2 * ctx:
        with pytest.raises(EvalError, match="needs at least 1024"):
            windows(1000, protocol, ctx)
        return
    wins = windows(1000, protocol, ctx, stride, chunks)
    assert len(wins) == want_windows
    assert sum(w.n_scored for w in wins) == want_tokens
    model = Oracle(torch.full((4,), 0.25))
    res = perplexity(model, torch.zeros(1000, dtype=torch.long), protocol, ctx, stride=stride,
                     chunks=chunks, progress=False)
    assert res["n_tokens"] == want_tokens and res["n_windows"] == want_windows


def test_sliding_windows_score_each_token_once_with_most_context():
    wins = windows(1000, "sliding", 100, 30)
    scored = []
    for w in wins:
        scored += list(range(w.start + w.first + 1, w.end))  # absolute positions of targets
    assert scored == list(range(1, 1000))


def test_sliding_matches_direct_scoring(tiny):
    # with a window as long as the text, sliding, gptq and a hand computation agree
    tokens = torch.randint(3, 256, (120,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logp = tiny(tokens[None]).logits[0, :-1].log_softmax(-1)
    direct = math.exp(-logp.gather(-1, tokens[1:, None]).mean().item())
    a = perplexity(tiny, tokens, "sliding", ctx=120, stride=60, progress=False)
    b = perplexity(tiny, tokens, "gptq", ctx=120, progress=False)
    assert a["ppl"] == pytest.approx(direct, rel=1e-5)
    assert b["ppl"] == pytest.approx(direct, rel=1e-5)


def test_llamacpp_scores_second_half_with_bos(tiny):
    tokens = torch.randint(3, 256, (128,), generator=torch.Generator().manual_seed(2))
    r = token_logprobs(tiny, tokens, "llamacpp", ctx=64, bos_id=1, progress=False)
    assert r["target"].tolist() == tokens[33:64].tolist() + tokens[97:128].tolist()
    ids = tokens[:64].clone()
    ids[0] = 1  # BOS replaces the first token of the chunk
    with torch.inference_mode():
        logp = tiny(ids[None]).logits[0].log_softmax(-1)
    want = -logp[32:63].gather(-1, tokens[33:64, None]).squeeze(-1)
    torch.testing.assert_close(r["nll"][:31].float(), want, rtol=1e-5, atol=1e-5)
    r0 = token_logprobs(tiny, tokens, "llamacpp", ctx=64, bos_id=None, progress=False)
    assert not torch.allclose(r0["nll"], r["nll"])  # the BOS really changed the input


def test_batching_does_not_change_results(tiny):
    tokens = torch.randint(3, 256, (640,), generator=torch.Generator().manual_seed(3))
    a = perplexity(tiny, tokens, "gptq", ctx=64, batch_size=1, progress=False)
    b = perplexity(tiny, tokens, "gptq", ctx=64, batch_size=4, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


def test_analytic_kl():
    P, Q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    want = (P * (P / Q).log()).sum().item()  # KL(P‖Q), P the reference
    res = kl_divergence(Oracle(Q), Oracle(P), torch.zeros(300, dtype=torch.long), ctx=30,
                        progress=False)
    assert res["kl_mean"] == pytest.approx(want, rel=1e-5)
    assert res["top1_agreement"] == 0.0  # argmax 0 vs argmax 2
    assert res["n_tokens"] == 10 * 29
    assert res["ppl_ref"] == pytest.approx(1 / 0.7, rel=1e-5)
    assert res["ppl"] == pytest.approx(1 / 0.2, rel=1e-5)


def test_kl_of_a_model_against_itself_is_zero(tiny):
    tokens = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(4))
    res = kl_divergence(tiny, tiny, tokens, ctx=64, progress=False)
    assert res["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["kl_max"] < 1e-5 and res["top1_agreement"] == 1.0
    assert res["ppl"] == pytest.approx(res["ppl_ref"])


def test_kl_is_positive_for_a_perturbed_model(tiny):
    import copy

    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    tokens = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(4))
    res = kl_divergence(other, tiny, tokens, ctx=64, progress=False)
    assert res["kl_mean"] > 1e-4 and res["kl_p99"] >= res["kl_median"] >= 0


def test_stderr_matches_llamacpp_formula():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0])
    m, se = mean_stderr(x)
    mean2 = (x * x).mean().item()
    assert m == pytest.approx(3.5)
    assert se == pytest.approx(math.sqrt((mean2 - 3.5 ** 2) / 3))


def test_bits_per_byte():
    nll = torch.full((4,), math.log(2) * 8, dtype=torch.float64)  # 8 bits per token
    lengths = torch.tensor([0, 2, 4])
    assert bits_per_byte(nll, torch.tensor([1, 1, 2, 2]), lengths) == pytest.approx(32 / 12)


def test_token_byte_lengths_on_the_real_tokenizer(default_model):
    _, tok = default_model
    lengths = token_byte_lengths(tok)
    text = "Bytes: naïve café, 日本語 and 12345 digits.\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert lengths[ids].sum().item() == len(text.encode("utf-8"))
    assert lengths[tok.convert_tokens_to_ids("<|im_start|>")] == 0


def test_bad_settings_give_clear_errors(tiny):
    tokens = torch.zeros(100, dtype=torch.long)
    with pytest.raises(EvalError, match="exceeds the model's maximum of 256"):
        perplexity(tiny, tokens, "gptq", ctx=512, progress=False)
    with pytest.raises(EvalError, match="has 100 tokens.*needs at least 128"):
        perplexity(tiny, tokens, "gptq", ctx=128, progress=False)
    with pytest.raises(EvalError, match="unknown protocol 'wiki'; use one of gptq, sliding"):
        perplexity(tiny, tokens, "wiki", ctx=10, progress=False)
    with pytest.raises(EvalError, match="stride=0"):
        windows(100, "sliding", 10, stride=0)


def test_decode_speed_steps_one_token_at_a_time_with_the_cache(tiny):
    lengths = []
    hook = tiny.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (kwargs["input_ids"].shape[1], kwargs.get("past_key_values") is not None)),
        with_kwargs=True)
    try:
        res = decode_tokens_per_s(tiny, torch.arange(5, 17), new_tokens=3, repeats=2, warmup=1)
    finally:
        hook.remove()
    # each run: the 12-token prompt once, then single tokens fed with the cache
    prompt, step = (12, False), (1, True)
    assert lengths == [prompt, step] + [prompt, step, step, step] * 2
    assert res["decode_new_tokens"] == 3 and res["prompt_tokens"] == 12
    assert res["decode_tokens_per_s"] == pytest.approx(3 / res["decode_seconds"])
    with pytest.raises(MeasureError, match="at least one generation step"):
        decode_tokens_per_s(tiny, torch.arange(5), new_tokens=0)
