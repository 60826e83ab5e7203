"""Grammar-constrained decoding (edgellm.lora.grammar): only dotted names, the end only after a
complete name, with the probability of leaving the grammar."""

import pytest
import torch

from edgellm.lora.grammar import DottedNameProcessor

pytestmark = pytest.mark.fast


class Tok:
    """A toy tokenizer: id → text."""

    texts = ["os", ".", "path", ".join", " is", "(", "<eos>", "2x", "a.b", "-"]
    eos_token_id = 6
    all_special_ids = [6]

    def __len__(self):
        return len(self.texts)

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def allowed(proc, answer):
    ids = torch.tensor([[9, 9] + answer])               # a 2-token prompt, then the answer
    return {Tok.texts[i] for i in proc.allowed(ids)[0].nonzero().flatten().tolist()}


def test_masks_follow_the_grammar():
    proc = DottedNameProcessor(Tok(), prompt_len=2)
    assert allowed(proc, []) == {"os", "path", "a.b"}                 # an identifier must start
    assert allowed(proc, [0]) == {"os", ".", "path", ".join", "2x", "a.b", "<eos>"}
    assert allowed(proc, [0, 1]) == {"os", "path", "a.b"}             # after "." : no end, no "2x"


def test_end_gets_the_probability_of_leaving_the_name():
    proc = DottedNameProcessor(Tok(), prompt_len=2)
    scores = torch.zeros(1, len(Tok.texts))
    scores[0, 4] = 3.0                                                  # " is": the model wants to stop
    out = proc(torch.tensor([[9, 9, 0]]), scores)
    leave = torch.tensor([3.0, 0.0, 0.0, 0.0])                         # " is", "(", "<eos>", "-"
    assert out[0, 6] == pytest.approx(torch.logsumexp(leave, 0).item())
    assert out[0, 4] == float("-inf") and out[0, 5] == float("-inf")
    assert out.argmax().item() == 6                                     # greedy stops: "os"
    first = proc(torch.tensor([[9, 9]]), scores)                        # nothing written yet
    assert first[0, 6] == float("-inf")
