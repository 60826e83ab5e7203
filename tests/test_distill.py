"""Knowledge distillation: the losses against closed forms and autograd, the top-k cache with its
tail bucket, students built on the tiny model, distillation lowering its loss, the SeqKD cache,
the derived-model mechanism and bad input (tiny model and toy tensors, seconds)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgellm.distill.apply import _Capture, distill
from edgellm.distill.losses import (
    DistillError,
    ce_loss,
    entropy,
    forward_kl,
    hidden_loss,
    reverse_kl,
    skew_kl,
    topk_forward_kl,
)
from edgellm.distill.seqkd import corpus_tokens, generate_corpus, read_cache, write_cache
from edgellm.distill.students import layer_map, layers_to_drop, make_student
from edgellm.distill.teacher import bytes_per_token, topk_of_logits, truncation_kl
from edgellm.models import decoder_layers, tiny_llama


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _probs_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float64)).float()


# --------------------------------------------------------------------------------------------
# losses


P = [0.7, 0.2, 0.1]  # teacher: one strong mode
Q = [0.4, 0.4, 0.2]  # student: spread


def test_forward_and_reverse_kl_match_the_closed_form():
    zt, zs = _probs_logits(P), _probs_logits(Q)
    assert forward_kl(zs, zt).item() == pytest.approx(_kl(P, Q), rel=1e-5)
    assert reverse_kl(zs, zt).item() == pytest.approx(_kl(Q, P), rel=1e-5)
    assert forward_kl(zs, zt).item() != pytest.approx(reverse_kl(zs, zt).item(), rel=1e-2)


def test_temperature_softens_and_multiplies_by_t_squared():
    zt, zs = torch.randn(5, 11), torch.randn(5, 11)
    T = 3.0
    pt, ps = F.softmax(zt / T, -1), F.softmax(zs / T, -1)
    want = T * T * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert forward_kl(zs, zt, temperature=T).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_forward_kl_gradient_is_t_times_ps_minus_pt(T):
    zt = torch.randn(3, 7)
    zs = torch.randn(3, 7, requires_grad=True)
    forward_kl(zs, zt, temperature=T).backward()
    want = T * (F.softmax(zs.detach() / T, -1) - F.softmax(zt / T, -1)) / 3  # mean over 3 rows
    assert torch.allclose(zs.grad, want, atol=1e-6)


def test_reverse_kl_is_mode_seeking_on_a_bimodal_teacher():
    """Fit one peaked student to a two-peak teacher: reverse KL prefers sitting on one mode,
    forward KL prefers covering both (the toy of lesson 07, on 3 outcomes)."""
    teacher = _probs_logits([0.49, 0.02, 0.49])
    on_one_mode = _probs_logits([0.96, 0.02, 0.02])
    covering = _probs_logits([0.34, 0.32, 0.34])
    assert reverse_kl(on_one_mode, teacher) < reverse_kl(covering, teacher)
    assert forward_kl(covering, teacher) < forward_kl(on_one_mode, teacher)
    assert entropy(on_one_mode) < entropy(covering)


def test_skew_kl_closed_form_bound_and_alpha_zero():
    zt, zs = _probs_logits(P), _probs_logits(Q)
    a = 0.1
    mix = [a * p + (1 - a) * q for p, q in zip(P, Q, strict=True)]
    assert skew_kl(zs, zt, alpha=a).item() == pytest.approx(_kl(P, mix), rel=1e-5)
    assert skew_kl(zs, zt, alpha=0.0).item() == pytest.approx(forward_kl(zs, zt).item(), rel=1e-6)
    far = _probs_logits([1e-6, 1e-6, 1 - 2e-6])
    assert skew_kl(far, zt, alpha=a).item() <= -math.log(a) + 1e-6


def test_mask_averages_over_scored_positions_only():
    zt, zs = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    per = [forward_kl(zs[b, t], zt[b, t]).item() for b, t in [(0, 0), (0, 1), (1, 0)]]
    assert forward_kl(zs, zt, mask=mask).item() == pytest.approx(sum(per) / 3, rel=1e-5)


def test_topk_with_k_equal_v_is_the_full_forward_kl():
    zt, zs = torch.randn(2, 5, 13), torch.randn(2, 5, 13)
    lp, idx = topk_of_logits(zt, 13, temperature=2.0)
    got = topk_forward_kl(zs, lp, idx, temperature=2.0)
    assert got.item() == pytest.approx(forward_kl(zs, zt, temperature=2.0).item(), rel=1e-5)


def test_topk_tail_bucket_closed_form():
    P4, Q4 = [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]
    zt, zs = _probs_logits(P4), _probs_logits(Q4)
    lp, idx = topk_of_logits(zt, 2)
    # teacher (0.5, 0.3 | tail 0.2) vs student (0.25, 0.25 | tail 0.5)
    want = _kl([0.5, 0.3, 0.2], [0.25, 0.25, 0.5])
    assert topk_forward_kl(zs, lp, idx).item() == pytest.approx(want, rel=1e-5)
    # the bucketed KL never exceeds the full one (data processing inequality)
    assert topk_forward_kl(zs, lp, idx) <= forward_kl(zs, zt) + 1e-6


def test_truncation_kl_and_memory():
    zt = torch.randn(4, 50) * 3
    errs = [truncation_kl(zt, k).mean().item() for k in (1, 5, 20, 50)]
    assert errs[-1] == 0.0 and all(a >= b - 1e-6 for a, b in zip(errs, errs[1:], strict=False))
    assert bytes_per_token(49152) == 196608 and bytes_per_token(49152, 64) == 512


def test_hidden_loss_mse_and_cosine():
    a = [torch.ones(1, 2, 4), torch.zeros(1, 2, 4)]
    b = [torch.ones(1, 2, 4) * 3, torch.ones(1, 2, 4)]
    assert hidden_loss(a, b).item() == pytest.approx((4 + 1) / 2)
    assert hidden_loss(a[:1], b[:1], kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DistillError):
        hidden_loss(a, b[:1])
    with pytest.raises(DistillError):
        hidden_loss(a, b, kind="l1")


def test_ce_loss_is_the_shifted_cross_entropy():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert ce_loss(out.logits, ids).item() == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_bad_temperature(bad):
    with pytest.raises(DistillError, match="temperature"):
        forward_kl(torch.randn(2, 3), torch.randn(2, 3), temperature=bad)


def test_other_vocabulary_is_refused_for_white_box_losses():
    with pytest.raises(DistillError, match="seqkd"):
        forward_kl(torch.randn(2, 5), torch.randn(2, 7))
    teacher, student = tiny_llama(vocab_size=300), tiny_llama()
    with pytest.raises(DistillError, match="vocabulary"):
        distill(student, teacher, torch.arange(600) % 256, loss="fkl", steps=1, seq_len=8)


def test_top_k_outside_the_vocabulary_is_refused():
    t = tiny_llama()
    for k in (-1, 257):
        with pytest.raises(DistillError, match="top-k"):
            distill(copy.deepcopy(t), t, torch.arange(600) % 256, loss="fkl", top_k=k, steps=1,
                    seq_len=8)


# --------------------------------------------------------------------------------------------
# students


@pytest.fixture(scope="module")
def tiny6():
    return tiny_llama(n_layers=6)


CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


def test_layers_to_drop_keeps_first_and_last():
    bi = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.2, 0.0])
    assert layers_to_drop(bi, 0.5) == [2, 3, 4]
    with pytest.raises(DistillError):
        layers_to_drop(bi, 0.9)


@pytest.mark.parametrize("kind", ["drop-layers", "channels", "nm", "lowrank", "none"])
def test_students_shapes_and_params(tiny6, kind):
    student, info = make_student(tiny6, kind, ratio=0.5, calib=CALIB)
    assert info["n_params_teacher"] == sum(p.numel() for p in tiny6.parameters())
    assert len(decoder_layers(tiny6)) == 6  # the teacher is untouched
    ids = CALIB[:1]
    assert student(input_ids=ids).logits.shape == (1, 32, 256)
    if kind == "drop-layers":
        assert info["n_layers"] == 3 and info["kept"][0] == 0 and info["kept"][-1] == 5
        assert layer_map(info) == info["kept"]
    elif kind == "none":
        assert info["n_params"] == info["n_params_teacher"]
    elif kind == "nm":
        lin = decoder_layers(student)[0].mlp.down_proj.weight
        assert (lin.view(lin.shape[0], -1, 4) != 0).sum(-1).max() <= 2
    else:
        assert info["n_params"] < info["n_params_teacher"]
    if kind != "drop-layers":
        assert layer_map(info) == list(range(6))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_0_1_is_refused(tiny6, ratio):
    with pytest.raises(DistillError, match="ratio"):
        make_student(tiny6, "drop-layers", ratio=ratio, calib=CALIB)


def test_unknown_student_is_refused(tiny6):
    with pytest.raises(DistillError, match="unknown student"):
        make_student(tiny6, "heads", ratio=0.2, calib=CALIB)


# --------------------------------------------------------------------------------------------
# distillation on the tiny model


@pytest.mark.parametrize("loss", ["fkl", "rkl", "skew", "mixed", "hidden", "ce"])
def test_distill_moves_the_student_toward_its_target(tiny6, loss):
    """On a short stream (overlapping windows), training lowers the divergence to the teacher
    (CE: the next-token loss) on a fixed batch of that stream."""
    student, info = make_student(tiny6, "drop-layers", ratio=0.5, calib=CALIB)
    tokens = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(2))
    batch = tokens[:33].view(1, -1)

    @torch.no_grad()
    def gap():
        pairs = list(enumerate(layer_map(info)))
        cs, ct = _Capture(student, [a for a, _ in pairs]), _Capture(tiny6, [b for _, b in pairs])
        z, zt = student(input_ids=batch).logits, tiny6(input_ids=batch).logits
        cs.close(), ct.close()
        ce, kl = ce_loss(z, batch).item(), forward_kl(z, zt).item()
        hid = hidden_loss([cs.out[a] for a, _ in pairs], [ct.out[b] for _, b in pairs]).item()
        return {"ce": ce, "mixed": 0.5 * ce + 0.5 * kl, "hidden": kl + hid}.get(loss, kl)

    before = gap()
    res = distill(student, tiny6, tokens, loss=loss, steps=10, batch_size=2, seq_len=32,
                  lr=1e-3, schedule="constant", layer_pairs=list(enumerate(layer_map(info))))
    assert gap() < before
    assert res.tokens_seen == 10 * 2 * 32 and len(res.train.losses) == 10
    if loss == "ce":
        assert res.seconds_teacher == 0.0
    else:
        assert 0 < res.seconds_teacher < res.seconds
    assert not any(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("loss", ["fkl", "ce"])
def test_micro_batches_give_the_same_steps(tiny6, loss):
    student, _ = make_student(tiny6, "drop-layers", ratio=0.5, calib=CALIB)
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
    runs = []
    for micro in (None, 1, 2):
        s = copy.deepcopy(student)
        res = distill(s, tiny6, tokens, loss=loss, steps=3, batch_size=4, seq_len=16, lr=1e-3,
                      micro_batch_size=micro)
        runs.append((res.train.losses, s.model.layers[0].mlp.up_proj.weight.clone()))
    for losses, w in runs[1:]:
        assert losses == pytest.approx(runs[0][0], rel=1e-4)
        assert torch.allclose(w, runs[0][1], atol=1e-6)


def test_topk_cache_matches_the_windows_and_trains(tiny6):
    student, _ = make_student(tiny6, "drop-layers", ratio=0.5, calib=CALIB)
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
    full = copy.deepcopy(student)
    res = distill(student, tiny6, tokens, loss="fkl", top_k=256, steps=6, batch_size=2,
                  seq_len=32, lr=3e-3)
    ref = distill(full, tiny6, tokens, loss="fkl", steps=6, batch_size=2, seq_len=32, lr=3e-3)
    # k = V: the cached loss is the full loss, step for step
    assert res.train.losses == pytest.approx(ref.train.losses, rel=1e-4)
    assert res.cache_bytes == 6 * 2 * 32 * 256 * 8 and res.seconds_teacher == 0.0
    with pytest.raises(DistillError, match="forward KL only"):
        distill(full, tiny6, tokens, loss="rkl", top_k=8, steps=1, seq_len=8)


# --------------------------------------------------------------------------------------------
# SeqKD cache


def test_seqkd_cache_roundtrip_sha_check_and_reuse(tmp_path, monkeypatch):
    from edgellm.deploy import server

    calls = []

    def fake_complete(url, prompt, **kw):
        calls.append(prompt)
        return f" -> {prompt[::-1]}"

    monkeypatch.setattr(server, "complete", fake_complete)
    monkeypatch.setattr(server, "check_endpoint", lambda url, **kw: {"data": [{"id": "fake"}]})
    path = tmp_path / "gen.jsonl"
    kw = dict(max_tokens=8, temperature=0.5, top_p=0.9, seed=3, cache_path=path,
              teacher={"url": "http://x"})
    recs = generate_corpus("http://x", ["ab", "cd"], **kw)
    assert [r["completion"] for r in recs] == [" -> ba", " -> dc"] and len(calls) == 2
    header, again = read_cache(path)
    assert again == recs and header["teacher"]["model"] == "fake"
    assert header["settings"]["temperature"] == 0.5
    assert generate_corpus("http://x", ["ab", "cd"], **kw) == recs and len(calls) == 2  # reused
    with pytest.raises(DistillError, match="other settings"):
        generate_corpus("http://x", ["ab", "cd"], **{**kw, "temperature": 0.9})
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"prompt": "ab", "completion": "edited"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DistillError, match="sha256"):
        read_cache(path)
    assert not list(tmp_path.glob(".gen.jsonl.*"))  # no temporary files left


def test_corpus_tokens_joins_prompt_and_completion():
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) for c in text]}

    toks = corpus_tokens([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
                         Tok())
    assert "".join(map(chr, toks.tolist())) == "ab\n\ncd"


def test_write_cache_is_atomic(tmp_path):
    path = write_cache(tmp_path / "c.jsonl", {"teacher": {}, "settings": {}},
                       [{"prompt": "p", "completion": "c"}])
    header, recs = read_cache(path)
    assert header["n"] == 1 and recs[0]["completion"] == "c"


# --------------------------------------------------------------------------------------------
# derived models (the draft)


def test_derived_model_missing_gives_the_build_command(tmp_path, monkeypatch):
    from edgellm import models

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    with pytest.raises(models.ModelUnavailable, match="edgellm distill .*--save-as smollm2-135m-draft"):
        models.load_model("smollm2-135m-draft")


def test_derived_model_saves_and_loads(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    from tokenizers import models as tkm
    from transformers import PreTrainedTokenizerFast

    from edgellm import models

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tkm.WordLevel({"a": 0, "[UNK]": 1},
                                                                            unk_token="[UNK]")))
    student, _ = make_student(tiny_llama(n_layers=4), "drop-layers", ratio=0.5, calib=CALIB)
    # the keys distill's record passes, `model` (the teacher's name) among them
    folder = models.save_derived("smollm2-135m-draft", student, tok, kept=[0, 3],
                                 model="smollm2-135m", student="drop-layers")
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert (manifest["kept"], manifest["model"]) == ([0, 3], "smollm2-135m")
    loaded, _ = models.load_model("smollm2-135m-draft")
    assert loaded.config.num_hidden_layers == 2
    ids = CALIB[:1]
    assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    models.save_derived("smollm2-135m-draft", student, tok)  # a rebuild replaces it
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m-draft"]


# --------------------------------------------------------------------------------------------
# the whole record, on the tiny model with a character tokenizer


class CharTok:
    """Bytes as token ids (vocabulary 256): enough for the record's data paths."""

    bos_token_id = None
    add_bos_token = False

    def __call__(self, text, **kw):
        return {"input_ids": [b for b in text.encode("utf-8")]}

    def decode(self, ids, **kw):
        return bytes(ids).decode("utf-8", errors="replace")

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.txt").write_text("bytes as token ids\n")


@pytest.fixture
def tiny_record(monkeypatch):
    from edgellm import data, models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (tiny_llama(n_layers=4), CharTok()))
    monkeypatch.setattr(data, "get_calibration", lambda *a, **k: CALIB)

    def run(**kw):
        from edgellm.distill.apply import distill_record
        from edgellm.metrics import EvalSettings

        ev = EvalSettings(ctx=64, max_tokens=512, batch_size=2)
        kw = {"student": "drop-layers", "ratio": 0.5, **kw}
        return distill_record("tiny", steps=3, batch_size=2, seq_len=32, lr=1e-3,
                              eval_settings=ev, **kw)
    return run


def test_distill_record_keys_and_protocol(tiny_record):
    from edgellm.measure import check_speed_keys

    rec = tiny_record(loss="fkl", top_k=16, time_steps=1, baseline_loss="ce", evaluate=True)
    for k in ("loss", "steps", "tokens_seen", "ppl", "ppl_base", "ppl_teacher", "kl_mean",
              "n_params", "seconds", "train_tokens_per_s", "speed_protocol", "peak_rss_bytes",
              "delta_nll", "delta_nll_stderr", "entropy_mean", "entropy_teacher",
              "delta_nll_vs_baseline", "delta_nll_vs_baseline_stderr", "ppl_baseline",
              "seconds_teacher_per_step", "seconds_student_per_step", "kd_overhead",
              "topk_speedup", "truncation_kl_mean", "teacher_bytes_per_token_topk"):
        assert rec.get(k) is not None, k
    assert rec["tokens_seen"] == 3 * 2 * 32 and rec["n_layers"] == 2
    assert rec["speed_protocol"]["train_tokens_per_s"]["name"] == "train"
    check_speed_keys(rec)
    json.dumps(rec)


def test_distill_record_saves_the_draft_under_its_name(tiny_record, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    rec = tiny_record(loss="fkl", save_as="smollm2-135m-draft")
    assert rec["saved_as"] == "smollm2-135m-draft" and rec["saved_folder_bytes"] > 0
    folder = tmp_path / "derived" / "smollm2-135m-draft"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert (manifest["model"], manifest["student"], manifest["steps"]) == ("tiny", "drop-layers", 3)


def test_distill_record_control_and_top_k_too_large(tiny_record):
    rec = tiny_record(loss="ce", student="none")  # the teacher itself, fine-tuned
    assert rec["n_params"] == rec["n_params_teacher"] and rec["ppl"] is None
    with pytest.raises(DistillError, match="top-k"):
        tiny_record(loss="fkl", top_k=1000)
