"""Text corpora, deterministic splits and calibration windows.

Corpora:

* ``pydoc`` — Python's own documentation topics (``pydoc_data.topics``), on every machine.
  The topics are joined in sorted-key order with blank lines and split at paragraph boundaries
  into train (first 80 % of characters), validation (next 10 %) and test (last 10 %).  The text
  changes between Python versions, so every result records its sha256.
* ``stdlib`` — Python source code: a fixed list of pure-Python standard-library modules (the
  registry's ``files``), read from the running interpreter's ``sysconfig`` stdlib folder, each
  preceded by a ``# file: <path>`` line, joined with blank lines and split like ``pydoc``.  The
  files change between Python versions, so each one is checked against the sha256 pinned in the
  registry; a mismatch is an error (set ``EDGELLM_STDLIB_UNPINNED=1`` to use the local files
  anyway: results then record a different ``data_sha256``).  A second, genuinely different
  domain (code, not prose) for contextual pruning and calibration experiments.
* ``wikitext2`` — WikiText-2 (raw).  From ``$EDGELLM_WIKITEXT2`` (a ``wiki.test.raw`` file or a
  folder holding ``wiki.{train,valid,test}.raw``) or, when online, from the hub.  Joined with
  ``"\\n\\n"`` between lines as in the GPTQ evaluation code.
* any path to a UTF-8 text file — used whole for every split.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from edgellm.errors import EdgeLLMError
from edgellm.paths import datasets_registry

SPLITS = ("train", "validation", "test")


class CorpusError(EdgeLLMError, ValueError):
    """Unknown corpus or split, missing file, too little text."""


def corpus_names() -> list[str]:
    """The registered text corpora (the registry's ``"kind": "task"`` entries are not corpora)."""
    reg = json.loads(datasets_registry().read_text())
    return sorted(n for n, info in reg.items() if info.get("kind") != "task")


def corpus_info(name: str) -> dict:
    return json.loads(datasets_registry().read_text())[name]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split_by_fraction(text: str, fractions=(0.8, 0.9)) -> dict[str, str]:
    """Cut at the first paragraph break at or after each fraction of the characters."""
    cuts = []
    for f in fractions:
        i = text.find("\n\n", int(len(text) * f))
        cuts.append(len(text) if i < 0 else i)
    a, b = cuts
    return {"train": text[:a], "validation": text[a:b].lstrip("\n"), "test": text[b:].lstrip("\n")}


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_paths()["stdlib"]``)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_text(root: str | os.PathLike | None = None, *, verify: bool | None = None) -> str:
    """The ``stdlib`` corpus: the registry's fixed list of standard-library modules, in order.

    Each file is read as UTF-8 text (universal newlines) and preceded by ``# file: <path>``;
    files are joined with a blank line.  ``root`` defaults to :func:`stdlib_dir`.  With
    ``verify`` (default: unless ``$EDGELLM_STDLIB_UNPINNED`` is set) every file's sha256 must
    match the registry's, otherwise :class:`CorpusError` names the files that differ.
    """
    import platform

    info = corpus_info("stdlib")
    pinned = info["sha256"]
    root = stdlib_dir() if root is None else Path(root)
    if verify is None:
        verify = not os.environ.get("EDGELLM_STDLIB_UNPINNED")
    parts, changed = [], []
    for rel in info["files"]:
        path = root / rel
        if not path.is_file():
            raise CorpusError(f"the stdlib corpus needs {rel}, which is not in {root}; this "
                              "Python's standard library lacks it (pinned for Python "
                              f"{pinned['python']})")
        text = path.read_text(encoding="utf-8")
        if verify and sha256_text(text) != pinned["files"][rel]:
            changed.append(rel)
        parts.append(f"# file: {rel}\n{text}")
    if changed:
        raise CorpusError(
            f"the stdlib corpus is pinned to the files of Python {pinned['python']}, but "
            f"{len(changed)} of {len(info['files'])} differ in this Python "
            f"({platform.python_version()}): {', '.join(changed)}. Results would not be "
            "comparable with the recorded ones; run under Python "
            f"{pinned['python']}, or set EDGELLM_STDLIB_UNPINNED=1 to use these files anyway "
            "(each result records the sha256 of the text it used)")
    return "\n\n".join(parts)


@lru_cache(maxsize=16)
def load_text(corpus: str = "pydoc", split: str = "test") -> str:
    """The text of one split of a corpus (a registry name or a path to a text file)."""
    if split not in SPLITS + ("all",):
        raise CorpusError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} or 'all'")
    if corpus == "pydoc":
        text = pydoc_text()
        return text if split == "all" else _split_by_fraction(text)[split]
    if corpus == "stdlib":
        text = stdlib_text()
        return text if split == "all" else _split_by_fraction(text)[split]
    if corpus == "wikitext2":
        return _wikitext2(split)
    path = Path(corpus).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{corpus} is not UTF-8 text (byte {e.start}: {e.reason}); give a "
                              "UTF-8 text file or a registered corpus") from None
    raise CorpusError(
        f"unknown corpus {corpus!r}; registered corpora: {', '.join(corpus_names())}, "
        "or give the path of a UTF-8 text file"
    )


_WIKI_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def _wikitext2(split: str) -> str:
    local = os.environ.get("EDGELLM_WIKITEXT2")
    if local:
        p = Path(local).expanduser()
        if p.is_dir():
            p = p / _WIKI_FILES["test" if split == "all" else split]
        if not p.is_file():
            raise CorpusError(f"EDGELLM_WIKITEXT2 points to {local}, but {p} is not a file")
        return p.read_text(encoding="utf-8")
    from edgellm.models import hub_reachable

    if not hub_reachable():
        raise CorpusError(
            "wikitext2 needs the Hugging Face hub, which is not reachable from here; download "
            "WikiText-2 raw elsewhere and set EDGELLM_WIKITEXT2 to wiki.test.raw (or its folder), "
            "or use the offline corpus 'pydoc'"
        )
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    hub_split = {"validation": "validation", "all": "test"}.get(split, split)
    path = hf_hub_download("Salesforce/wikitext", repo_type="dataset",
                           filename=f"wikitext-2-raw-v1/{hub_split}-00000-of-00001.parquet")
    return "\n\n".join(pq.read_table(path).column("text").to_pylist())


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def get_tokens(corpus: str, tokenizer, split: str = "test", max_tokens: int | None = None):
    """Token ids of a split, optionally cut to the first ``max_tokens``."""
    ids = tokenize(load_text(corpus, split), tokenizer)
    return ids[:max_tokens] if max_tokens else ids


def get_calibration(corpus: str = "pydoc", n_samples: int = 128, seq_len: int = 512,
                    seed: int = 0, *, tokenizer=None) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the train split: (n_samples, seq_len).

    The GPTQ/AWQ convention: each window starts at a uniformly random offset; reproducible by seed.
    """
    if tokenizer is None:
        from edgellm.models import load_model

        _, tokenizer = load_model()
    if n_samples < 1 or seq_len < 1:
        raise CorpusError(f"n_samples={n_samples} and seq_len={seq_len} must both be at least 1")
    ids = tokenize(load_text(corpus, "train"), tokenizer)
    if len(ids) <= seq_len:
        raise CorpusError(
            f"the train split of {corpus!r} has {len(ids)} tokens; seq_len={seq_len} needs at "
            f"least {seq_len + 1}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
