"""The error of the pipeline: every bad recipe, unknown budget or failed step raises it."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class PipelineError(EdgeLLMError, ValueError):
    """A recipe that cannot run (unknown step, mismatched steps, bad setting), an unknown budget,
    or a failed step (the message names it)."""
