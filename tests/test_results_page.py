"""The results page: speed columns grouped by protocol, lesson figures for lesson sweeps."""

import json
import re

from edgellm.course.results_page import headline, lesson_plot, render_results, results_table
from edgellm.lessons import perplexity, weight_quant


def _rec(i, name, speed):
    return {"bits": 4, "method": f"m{i}", "ppl": 10.0 + i, "command": f"edgellm prune --x {i}",
            "prefill_tokens_per_s": speed, "prefill_tokens_per_s_base": 2 * speed,
            "speed_protocol": dict.fromkeys(("prefill_tokens_per_s", "prefill_tokens_per_s_base"),
                                            {"name": name})}


def test_speed_columns_never_mix_protocols(tmp_path):
    recs = [_rec(0, "legacy-best-of-3", 11.5), _rec(1, "paired-prefill", 22.5)]
    rows = [headline(r) for r in recs]
    assert rows[0]["speed"] == {"legacy-best-of-3": {"prefill_tokens_per_s": 11.5,
                                                     "prefill_tokens_per_s_base": 23.0}}
    table = results_table(rows)
    assert re.findall(r'<th colspan="2"[^>]*>speed: ([\w-]+)</th>', table) == [
        "legacy-best-of-3", "paired-prefill"]
    # each row fills only its own protocol's columns
    cells = re.findall(r"<td>([^<]*)</td>", table.split("<tbody>")[1].split("</tr>")[1])
    assert cells[-4:] == ["&mdash;", "&mdash;", "22.5", "45"]
    assert "paired-prefill</code>: candidate and reference" in table  # the protocol legend
    summary = render_results(tmp_path, [{"name": "speeds", "commands": [], "records": recs}])
    saved = json.loads((tmp_path / "results.json").read_text())["sweeps"][0]["records"]
    assert saved[1]["speed"]["paired-prefill"]["prefill_tokens_per_s"] == 22.5
    assert summary["sweeps"][0]["plot"] == "results/speeds.png"  # ppl against method, labelled


def test_lesson_sweeps_use_the_lessons_own_plot():
    assert lesson_plot("03_w4g64") is weight_quant.plot_tradeoff
    assert lesson_plot("01_ppl_vs_ctx") is perplexity.plot_ppl_vs_ctx
    assert lesson_plot("04_w8a8") is not None and lesson_plot("06_sparsity") is not None
    assert lesson_plot("05_bnb") is None and lesson_plot("01_protocols") is None
