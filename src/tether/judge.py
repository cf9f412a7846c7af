"""Generative judges (seed §3): a causal LM scores a response by its own verdict,

    r(x, y) = log p(yes | x, y, I) - log p(no | x, y, I)      (or p(yes | x, y, I))

for an instruction I such as "Is this answer correct?". Zero-shot from any causal LM, or trained
with the yes/no objective of seed §3 — maximise p(yes | x, y+, I) and p(no | x, y-, I) — which is
supervised fine-tuning on judge prompts whose completion is the verdict word, so training reuses
:func:`tether.sft.train` unchanged.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from .arith import ArithSpec, corrupt, sample_problems
from .data import Example, collate, prompt_ids
from .modeling import head_logits, hidden_at, load_causal_lm, load_tokenizer, padding_id

DEFAULT_INSTRUCTION = "Is the answer correct?"
TEMPLATE = "{prompt}{completion}\nInstruction: {instruction}\nVerdict:"
YES, NO = " yes", " no"


def judge_prompt(prompt: str, completion: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return TEMPLATE.format(prompt=prompt, completion=completion, instruction=instruction)


def judge_rows(spec: ArithSpec, n: int, seed: int, split: str = "train",
               instruction: str = DEFAULT_INSTRUCTION) -> list[dict[str, str]]:
    """Labelled (x, y, correct?) data of the arithmetic world as SFT rows: the judge prompt and
    the verdict " yes" (a correct worked answer) or " no" (a corruption of it), half each."""
    rng = random.Random(f"arith-judge-{split}-{seed}")
    rows = []
    for p in sample_problems(spec, n, seed + 104729, split):
        good = rng.random() < 0.5
        completion = p.completion if good else corrupt(p, rng)[0]
        rows.append({"prompt": judge_prompt(p.prompt, completion, instruction), "completion": YES if good else NO,
                     "correct": good})
    return rows


class Judge:
    """Scores (prompt, completion) pairs with a causal LM's verdict log-probabilities."""

    def __init__(self, path: str | Path, instruction: str = DEFAULT_INSTRUCTION, mode: str = "logratio",
                 batch_size: int = 64):
        if mode not in ("logratio", "p_yes"):
            raise ValueError(f"unknown judge mode {mode!r}; choose from logratio, p_yes")
        self.model = load_causal_lm(path).eval()
        self.tokenizer = load_tokenizer(path)
        self.instruction, self.mode, self.batch_size = instruction, mode, batch_size
        # The first token of each verdict word decides (exact when each is one token).
        self.yes_id = self.tokenizer(YES, add_special_tokens=False)["input_ids"][0]
        self.no_id = self.tokenizer(NO, add_special_tokens=False)["input_ids"][0]
        if self.yes_id == self.no_id:
            raise ValueError("the tokenizer gives ' yes' and ' no' the same first token")

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        pad = padding_id(tok)
        rows = []
        for p, c in zip(prompts, completions):
            ids = prompt_ids(tok, judge_prompt(p, c, self.instruction))
            rows.append(Example(ids, [0] * len(ids)))
        out = []
        for i in range(0, len(rows), self.batch_size):
            b = collate(rows[i:i + self.batch_size], pad)
            last = b.attention_mask.sum(-1) - 1  # right padding: the verdict is predicted here
            hidden = hidden_at(self.model, torch.arange(len(last)), last, input_ids=b.input_ids,
                               attention_mask=b.attention_mask)  # the last layer only at that position
            logits = head_logits(self.model, hidden).float()
            logp = torch.log_softmax(logits, -1)
            yes, no = logp[:, self.yes_id], logp[:, self.no_id]
            out.append(yes - no if self.mode == "logratio" else yes.exp())
        return torch.cat(out) if out else torch.zeros(0)
