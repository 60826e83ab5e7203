"""Speed and memory protocols: every speed figure names how it was measured."""

import itertools

import pytest
import torch

from edgellm.measure import (
    SPEED_PROTOCOLS,
    MeasureError,
    as_base,
    check_speed_keys,
    decode_tokens_per_s,
    merge,
    paired_prefill,
    prefill_tokens_per_s,
    protocol,
)


def fake_timer(durations):
    """A clock whose successive (start, stop) readings are ``durations`` seconds apart."""
    clock = itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations))
    return lambda: next(clock)


def test_paired_speedup_is_the_median_of_per_pair_ratios(tiny):
    reference = type(tiny)(tiny.config).eval()
    # warm-up pair, then three pairs: (model s, reference s)
    pairs = [(9.0, 9.0), (1.0, 3.0), (2.0, 2.0), (4.0, 12.0)]
    res = paired_prefill(tiny, reference, torch.arange(64) % 50 + 3, seq_len=32, repeats=3,
                         timer=fake_timer([t for p in pairs for t in p]))
    assert res["speedup"] == 3.0            # ratios 3, 1, 3; the medians' ratio would be 1.5
    assert res["prefill_tokens_per_s"] == 32 / 2.0 and res["prefill_tokens_per_s_base"] == 32 / 3.0
    assert {e["name"] for e in res["speed_protocol"].values()} == {"paired-prefill"}
    assert res["speed_protocol"]["speedup"]["repeats"] == 3
    check_speed_keys(res)


def test_paired_prefill_times_both_models_alternately(tiny):
    calls = []
    a, b = tiny, type(tiny)(tiny.config).eval()
    a.register_forward_hook(lambda *_: calls.append("a"))
    b.register_forward_hook(lambda *_: calls.append("b"))
    res = paired_prefill(a, b, torch.arange(64) % 50 + 3, seq_len=32, repeats=3)
    assert res["prefill_tokens_per_s"] > 0 and res["speedup"] > 0
    assert calls == ["a", "b"] * 4  # a warm-up pair, then three timed pairs
    with pytest.raises(MeasureError, match="too few"):
        paired_prefill(a, b, torch.arange(10), seq_len=32)
    with pytest.raises(MeasureError, match="repeats"):
        paired_prefill(a, b, torch.arange(64), seq_len=32, repeats=0)


def test_prefill_and_decode_records_name_their_protocol(tiny):
    pre = prefill_tokens_per_s(tiny, torch.arange(3, 67), ctx=16, batch_size=2, warmup=1)
    assert pre["prefill_tokens"] == 64 and pre["prefill_tokens_per_s"] > 0
    assert pre["speed_protocol"]["prefill_tokens_per_s"] == {
        "name": "prefill", "batch": 2, "ctx": 16, "windows": 4, "logits": "all", "warmup": 1}
    dec = decode_tokens_per_s(tiny, torch.arange(5, 17), new_tokens=3, repeats=2, warmup=1)
    assert dec["speed_protocol"]["decode_tokens_per_s"] == {
        "name": "decode", "batch": 1, "prompt_tokens": 12, "new_tokens": 3, "repeats": 2,
        "warmup": 1}
    rec = merge({"ppl": 1.0}, pre, as_base(dec))
    assert rec["speed_protocol"]["decode_tokens_per_s_base"]["name"] == "decode"
    assert "decode_tokens_per_s" not in rec and "decode_tokens_per_s_base" in rec
    check_speed_keys(rec)
    with pytest.raises(MeasureError, match="no window of ctx=128"):
        prefill_tokens_per_s(tiny, torch.arange(64), ctx=128)


@pytest.mark.parametrize("record, message", [
    ({"tokens_per_s": 10.0}, "does not say what was timed"),
    ({"tokens_per_s_eval": 10.0}, "does not say what was timed"),
    ({"prefill_tokens_per_s": 10.0}, "has no speed_protocol entry"),
    ({"decode_tokens_per_s_base": 10.0, "speed_protocol": {}}, "has no speed_protocol entry"),
    ({"speedup": 1.2, "speed_protocol": {"speedup": {}}}, "has no speed_protocol entry"),
    ({"train_tokens_per_s": 10.0, "speed_protocol": {"train_tokens_per_s": {"name": "fast"}}},
     "not defined"),
])
def test_speed_key_rule_rejects(record, message):
    with pytest.raises(MeasureError, match=message):
        check_speed_keys(record)


def test_speed_key_rule_accepts_named_protocols():
    check_speed_keys({"ppl": 3.0, "n_tokens_speed": 64, "decode_seconds": 1.0})  # no speed key
    check_speed_keys({"eval_tokens_per_s": 5.0,
                      "speed_protocol": {"eval_tokens_per_s": protocol("eval-loop", ctx=512)}})
    assert all(isinstance(v, str) and v for v in SPEED_PROTOCOLS.values())
    assert all("committed records" in v for k, v in SPEED_PROTOCOLS.items()
               if k.startswith("legacy-"))
    with pytest.raises(MeasureError, match="unknown speed protocol"):
        protocol("best-guess")


def test_peak_rss_can_be_reset_between_commands():
    """run_command resets the peak before each recorded command; where the platform allows it,
    a big allocation freed before the reset does not count in the next measurement."""
    import sys

    from edgellm.measure import peak_rss_bytes, reset_peak_rss

    big = bytearray(300 * 2**20)  # 300 MiB, touched
    big[::4096] = b"x" * len(big[::4096])
    high = peak_rss_bytes()
    del big
    if not reset_peak_rss():
        pytest.skip(f"no resettable peak RSS on {sys.platform}")
    assert peak_rss_bytes() < high - 200 * 2**20
