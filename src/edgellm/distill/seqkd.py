"""Black-box distillation (sequence-level KD, Kim & Rush 2016): the student sees only text the
teacher wrote.

The teacher is reached as an API would be: an OpenAI-compatible ``/v1/completions`` endpoint
(:mod:`edgellm.deploy.server`: any URL, or llama.cpp's server started here on a GGUF).  No
logits cross the wire, so the teacher may have another tokenizer and family.  Prompts are the
first ``prompt_tokens`` tokens of random windows of a train split (or the lines of a file); the
generations are cached as JSONL::

    {"header": {"teacher": {...}, "settings": {...}, "n": 64, "sha256": "<of the records>"}}
    {"prompt": "...", "completion": "..."}
    ...

written to a temporary file and renamed, and the sha256 is checked whenever the cache is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from edgellm.distill.losses import DistillError
from edgellm.paths import cache_dir


def prompts_from_corpus(tokenizer, *, corpus: str = "pydoc", n_prompts: int = 64,
                        prompt_tokens: int = 32, seed: int = 0) -> list[str]:
    """``n_prompts`` texts: the first ``prompt_tokens`` tokens of random windows of the train
    split (reproducible by ``seed``)."""
    from edgellm.data import get_tokens
    from edgellm.train import train_windows

    ids = train_windows(get_tokens(corpus, tokenizer, "train"), n_prompts, prompt_tokens,
                        seed)  # (n, prompt_tokens)
    return [tokenizer.decode(row.tolist()) for row in ids]


def prompts_from_file(path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln.strip()]
    if not prompts:
        raise DistillError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def _sha(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def read_cache(path) -> tuple[dict, list[dict]]:
    """``(header, records)`` of a generation cache, after checking its sha256."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])["header"]
        records = [json.loads(ln) for ln in lines[1:] if ln]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DistillError(f"generation cache {path} is unreadable ({e}); delete it to "
                           "generate again") from None
    if len(records) != header.get("n") or _sha(records) != header.get("sha256"):
        raise DistillError(f"generation cache {path} does not match its sha256 (edited or cut "
                           "short); delete it to generate again")
    return header, records


def write_cache(path, header: dict, records: list[dict]) -> Path:
    """Write a cache atomically (temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**header, "n": len(records), "sha256": _sha(records)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": header}, sort_keys=True, ensure_ascii=False) + "\n")
            for r in records:
                f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def generate_corpus(url: str, prompts: list[str], *, max_tokens: int = 192,
                    temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
                    cache_path=None, teacher: dict | None = None,
                    progress: bool = False) -> list[dict]:
    """The teacher's completion of every prompt: ``[{"prompt", "completion"}, …]``.

    ``url`` an OpenAI-compatible endpoint; prompt ``i`` is sampled with seed ``seed + i``.
    With ``cache_path``: reused when it exists (same teacher identity and settings, sha256
    checked), otherwise written after all prompts are done.  ``teacher`` (identity: model
    name, GGUF sha256, url) goes into the header.
    """
    from edgellm.deploy.server import check_endpoint, complete

    settings = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "prompts_sha256": hashlib.sha256(
                    "\n".join(prompts).encode()).hexdigest()}
    teacher = dict(teacher or {})
    if cache_path is not None and Path(cache_path).is_file():
        header, records = read_cache(cache_path)
        made_by = header.get("teacher") or {}
        if header.get("settings") != settings or any(made_by.get(k) != v
                                                      for k, v in teacher.items()):
            raise DistillError(f"generation cache {cache_path} was made with another teacher "
                               "or other settings; delete it or choose another path")
        return records
    models = check_endpoint(url)
    if "model" not in teacher:
        data = models.get("data") or [{}]
        teacher["model"] = data[0].get("id")
    teacher.setdefault("url", url)
    it = enumerate(prompts)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(prompts), desc="teacher generates", leave=False)
    records = [{"prompt": p, "completion": complete(url, p, max_tokens=max_tokens,
                                                    temperature=temperature, top_p=top_p,
                                                    seed=seed + i)}
               for i, p in it]
    if cache_path is not None:
        write_cache(cache_path, {"teacher": teacher, "settings": settings}, records)
    return records


def corpus_tokens(records: list[dict], tokenizer) -> torch.Tensor:
    """One 1-D token stream of ``prompt + completion`` documents joined by blank lines."""
    from edgellm.data import tokenize

    return tokenize("\n\n".join(r["prompt"] + r["completion"] for r in records), tokenizer)


def seqkd_tokens(tokenizer, *, url: str | None = None, gguf=None, prompts_file=None,
                 corpus: str = "pydoc", n_prompts: int = 64, prompt_tokens: int = 32,
                 max_tokens: int = 192, temperature: float = 0.7, top_p: float = 0.95,
                 seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The SeqKD training stream and what made it: ``(tokens, info)``.

    The teacher is ``url`` (any OpenAI-compatible endpoint) or a :class:`LlamaServer` started
    on ``gguf`` (default: the default model's GGUF) for the time of the generation.  The
    generations are cached under the cache folder, keyed by teacher identity and settings.
    """
    from edgellm.models import default_gguf, sha256_file

    prompts = (prompts_from_file(prompts_file) if prompts_file else
               prompts_from_corpus(tokenizer, corpus=corpus, n_prompts=n_prompts,
                                   prompt_tokens=prompt_tokens, seed=seed))
    if url:
        teacher = {"url": url}
    else:
        gguf = Path(gguf) if gguf else default_gguf(quiet=True)
        teacher = {"gguf": gguf.name, "gguf_sha256": sha256_file(gguf), "model": gguf.name}
    settings = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    key = hashlib.sha256(json.dumps([teacher, settings, prompts], sort_keys=True).encode())
    path = cache_dir() / "seqkd" / f"{key.hexdigest()[:20]}.jsonl"
    if url or path.is_file():
        records = generate_corpus(url or "", prompts, cache_path=path, teacher=teacher,
                                  progress=progress, **settings) if url else \
            _reuse(path, prompts, teacher, settings)
    else:
        from edgellm.deploy.server import LlamaServer

        with LlamaServer(gguf) as srv:
            records = generate_corpus(srv.url, prompts, cache_path=path,
                                      teacher={**teacher, "url": "llama_cpp.server (local)"},
                                      progress=progress, **settings)
    tokens = corpus_tokens(records, tokenizer)
    info = {"seqkd_teacher": teacher, "seqkd_prompts": len(prompts),
            "seqkd_prompt_tokens": prompt_tokens if not prompts_file else None,
            "seqkd_gen_tokens": max_tokens, "seqkd_gen_temperature": temperature,
            "seqkd_top_p": top_p, "seqkd_corpus_tokens": len(tokens),
            "seqkd_cache": path.name}
    return tokens, info


def _reuse(path: Path, prompts, teacher, settings) -> list[dict]:
    header, records = read_cache(path)
    if header["settings"].get("prompts_sha256") != hashlib.sha256(
            "\n".join(prompts).encode()).hexdigest():
        raise DistillError(f"generation cache {path} holds other prompts; delete it")
    return records
