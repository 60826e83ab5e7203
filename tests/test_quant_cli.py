"""``edgellm quantize`` from the command line (small token counts: the point is the plumbing)."""

import json

import pytest

from edgellm.cli import main


def _run(capsys, *argv):
    code = main(["quantize", *argv])
    out = capsys.readouterr()
    return code, out


def test_parser_group_size_channel():
    from edgellm.cli import build_parser

    args = build_parser().parse_args(["quantize", "--group-size", "channel", "--sym"])
    assert args.group_size is None and args.sym and args.method == "rtn"
    assert build_parser().parse_args(["quantize", "--group-size", "0"]).group_size is None
    assert build_parser().parse_args(["quantize"]).group_size == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--group-size", "big"])


@pytest.mark.integration
def test_bad_group_size_is_a_clear_error(capsys):
    code, out = _run(capsys, "--method", "rtn", "--group-size", "100", "--json")
    assert code == 2
    assert "group_size=100 does not divide in_features=576" in out.err and "192" in out.err


@pytest.mark.integration
def test_bad_bits_is_a_clear_error(capsys):
    code, out = _run(capsys, "--bits", "9", "--json")
    assert code == 2 and "bits=9 is not supported" in out.err


@pytest.mark.integration
def test_rtn_q4_1_setting_is_lossless_with_eval(capsys, tmp_path):
    code, out = _run(capsys, "--method", "rtn", "--bits", "4", "--group-size", "32", "--eval",
                     "--ctx", "64", "--max-tokens", "128", "--out", str(tmp_path / "q"), "--json")
    assert code == 0
    rec = json.loads(out.out)
    for key in ("method", "bits", "group_size", "bpw", "size_bytes", "ppl", "ppl_base", "kl_mean",
                "seconds_quantize", "delta_nll", "delta_nll_stderr", "top1_agreement"):
        assert key in rec, key
    assert rec["bpw"] == 5.0 and rec["group_size"] == 32 and rec["sym"] is False
    assert rec["lossless"] and rec["max_abs_weight_change"] == 0.0
    assert rec["kl_mean"] == 0.0 and rec["ppl"] == rec["ppl_base"] and rec["delta_nll"] == 0.0
    assert abs(rec["file_bytes"] / rec["size_bytes"] - 1) < 0.01
    assert rec["embedding_quantized"] is False and rec["n_layers"] == 210


@pytest.mark.integration
def test_gguf_q4_0_loses_something(capsys):
    code, out = _run(capsys, "--method", "gguf", "--type", "Q4_0", "--eval", "--ctx", "64",
                     "--max-tokens", "128", "--json")
    assert code == 0
    rec = json.loads(out.out)
    assert rec["type"] == "Q4_0" and rec["bpw"] == 4.5 and rec["bits"] == 4
    assert rec["kl_mean"] > 0 and rec["ppl"] != rec["ppl_base"] and not rec["lossless"]
    assert rec["max_abs_weight_change"] > 0


def test_missing_method_module_is_a_clear_error(monkeypatch):
    from edgellm.quant import cli
    from edgellm.quant.qtensor import QuantError

    with pytest.raises(QuantError, match="not available"):
        cli._import_method("no_such_method", "apply_x")
