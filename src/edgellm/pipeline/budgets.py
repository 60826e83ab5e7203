"""Device budgets: a file size, a decode speed on this machine and a quality floor, fixed here.

``phone`` (the capstone's budget):

* **size** ≤ 64 MiB = 67,108,864 bytes of the GGUF file (binary MiB: the reference recipe's
  file, 66,394,560 bytes, does not fit 64 MB = 64,000,000).  The default model at Q4_0 with a
  Q8_0 token embedding is 91.7 MB (``results/11_types.json``): it needs about 30 % of the MLP
  channels removed and the tied embedding (28.3 M of the 135 M parameters) in 4 bits as well.
* **decode** ≥ 100 tokens/s in llama.cpp, batch 1 with the KV cache, 2 threads, on the course
  machine (AMD EPYC, 2 cores; protocol ``decode``: 127 steps after a 128-token pydoc prompt,
  median of 3 runs; :func:`edgellm.deploy.apply.bench_runtime`).  The reference file (69.0 MB
  read per token: Q4_0 linears 46.7 MB, the tied embedding as the output head 17.7 MB, the KV
  cache) decodes at 131.5 tokens/s there in the grade and 158.9 in the run's benchmark step,
  llama-bench tg128 at 151 ± 21 and 189 (``results/13_pipeline.json``, nothing else running).  A timing beside other jobs falls
  far below (12-16 tokens/s at load 3-5): the grade records ``load_average_before_timing``.
* **perplexity** ≤ 1.6 × the fp32 default model's on the first 8,192 tokens of the pydoc test
  split, windows of 512 tokens (gptq protocol), the file run by llama.cpp, fp32 in PyTorch on the
  same tokens (paired: ``ppl / ppl_base = exp(ΔNLL)``, so the floor is ΔNLL ≤ ln 1.6 = 0.470).
* **task accuracy** ≥ the base model's on the ``funccall`` task (:mod:`edgellm.lora.funccall`),
  measured by one evaluator: the first :data:`TASK_ITEMS` test items (the task's fixed
  sha256 order), llama.cpp greedy at most 16 new tokens, exact match.  The candidate answers the
  plain chat prompt (what a deployed model is asked); the base model (its fp32 GGUF) gets its
  best prompt (``fewshot``: the instruction and 3 train items), so the bar is not the format.

Each criterion has a verdict (:func:`edgellm.pipeline.grading.verdicts`): ``pass`` / ``fail``
where the measurement resolves it (two standard errors away from the limit), ``not resolved``
otherwise; ``within_budget`` asks every point estimate to meet its limit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIB = 1 << 20
#: test items of the task evaluation (standard error of an accuracy p: sqrt(p(1-p)/n))
TASK_ITEMS = 128
#: the perplexity evaluation of every budget (edgellm.metrics.evaluate_paired's keywords)
PPL_EVAL = {"data": "pydoc", "split": "test", "protocol": "gptq", "ctx": 512,
            "max_tokens": 8192, "batch_size": 1}
#: the speed measurement (edgellm.deploy.apply.bench_runtime's keywords, threads apart)
BENCH = {"prompt_tokens": 128, "gen_tokens": 128, "repeats": 3}
#: llama.cpp threads of the perplexity and task evaluations (their numbers do not depend on
#: it; one thread suffers least from other jobs on the machine)
EVAL_THREADS = 1
#: the task evaluation: the candidate's prompt, the base model's prompt, new tokens
TASK_EVAL = {"task": "funccall", "items": TASK_ITEMS, "style": "plain", "base_style": "fewshot",
             "max_new_tokens": 16}


@dataclass(frozen=True)
class Budget:
    """A device budget: the largest file (``max_bytes``), the slowest decode
    (``min_decode_tokens_per_s`` at ``threads``), the largest perplexity relative to fp32
    (``max_ppl_ratio``) and the task accuracy relative to the base model
    (``min_accuracy_delta``: accuracy − accuracy_base must be at least this)."""

    name: str
    max_bytes: int
    min_decode_tokens_per_s: float
    max_ppl_ratio: float
    min_accuracy_delta: float = 0.0
    threads: int = 2
    about: str = ""

    @property
    def max_delta_nll(self) -> float:
        return math.log(self.max_ppl_ratio)

    def info(self) -> dict:
        return asdict(self)


BUDGETS: dict[str, Budget] = {
    "phone": Budget("phone", max_bytes=64 * MIB, min_decode_tokens_per_s=100.0,
                    max_ppl_ratio=1.6, min_accuracy_delta=0.0, threads=2,
                    about="a phone-class device: 64 MiB file, >= 100 tokens/s at 2 threads, "
                          "PPL <= 1.6x fp32, funccall accuracy >= the base model's"),
}


def get_budget(name: str) -> Budget:
    """The budget called ``name``, or a clear error naming the known ones."""
    from edgellm.pipeline.errors import PipelineError

    if name not in BUDGETS:
        raise PipelineError(f"unknown budget {name!r}; known budgets: {', '.join(BUDGETS)}")
    return BUDGETS[name]
