"""Each lesson section must run after a kernel restart: the runner's ``%reset -f`` cells test it."""

import nbformat
import pytest

from edgellm.course.run import (
    RESET_TAG,
    insert_section_resets,
    remove_section_resets,
    run_notebook,
    section_starts,
)


def _notebook(second_section: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"),
                nbformat.v4.new_markdown_cell("## 1. One"),
                nbformat.v4.new_code_cell("import math\nx = math.pi"),
                nbformat.v4.new_markdown_cell("Text, not a section.\n## not at the start"),
                nbformat.v4.new_markdown_cell("## 2. Two"),
                nbformat.v4.new_code_cell(second_section)]
    return nb


def test_resets_go_before_each_section_and_come_out_again():
    nb = _notebook("print(1)")
    before = [c.source for c in nb.cells]
    assert section_starts(nb) == [1, 4]
    assert insert_section_resets(nb) == 2
    assert [c.source for c in nb.cells][1:3] == ["%reset -f", "## 1. One"]
    assert [c.source for c in nb.cells][5:7] == ["%reset -f", "## 2. Two"]
    assert all(RESET_TAG in c.metadata["tags"] for c in nb.cells if c.source == "%reset -f")
    remove_section_resets(nb)
    assert [c.source for c in nb.cells] == before


@pytest.mark.notebook
def test_a_section_that_leans_on_an_earlier_one_fails_only_with_resets(tmp_path):
    path = tmp_path / "lesson.ipynb"
    nbformat.write(_notebook("y = x * 2"), path)          # needs section 1's x
    assert not run_notebook(path, fast=True).errors
    run = run_notebook(path, fast=True, reset_sections=True)
    assert [e["ename"] for e in run.errors] == ["NameError"]
    assert run.errors[0]["cell"] == 5                      # indices of the notebook as written
    assert not any(c.source == "%reset -f" for c in run.nb.cells)

    nbformat.write(_notebook("import math\ny = math.pi * 2"), path)   # self-contained
    assert not run_notebook(path, fast=True, reset_sections=True).errors


@pytest.mark.notebook
def test_an_executed_notebook_reports_its_kernels_peak_memory(tmp_path):
    # a cell that holds 300 MB: the kernel's peak must show it; the measuring cell comes out again
    path = tmp_path / "lesson.ipynb"
    nb = _notebook("import numpy as np\nbig = np.ones(300 * 2**20 // 8)\ndel big")
    n_cells = len(nb.cells)
    nbformat.write(nb, path)
    run = run_notebook(path, fast=True, out=tmp_path / "out.ipynb")
    assert not run.errors and len(run.nb.cells) == n_cells
    assert 300 * 2**20 < run.peak_rss_bytes < 8 * 2**30
    written = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert written.metadata["edgellm"]["peak_rss_bytes"] == run.peak_rss_bytes
    assert len(written.cells) == n_cells

    nbformat.write(_notebook("raise ValueError('stop')"), path)
    assert run_notebook(path, fast=True, stop_on_error=True).peak_rss_bytes is None
