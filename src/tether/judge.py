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
        self.yes_ids = self.tokenizer(YES, add_special_tokens=False)["input_ids"]
        self.no_ids = self.tokenizer(NO, add_special_tokens=False)["input_ids"]
        if self.yes_ids == self.no_ids:
            raise ValueError("the tokenizer gives ' yes' and ' no' the same tokens")
        # one token each (most tokenizers): the verdict position's distribution decides. Otherwise each
        # word's whole log-probability: a first token such as a bare ' ' says nothing about the verdict
        self.single = len(self.yes_ids) == 1 and len(self.no_ids) == 1

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):  # zip would score the shorter list and drop the rest unsaid
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: give one prompt per completion")
        tok = self.tokenizer
        pad = padding_id(tok)
        rows = []
        for p, c in zip(prompts, completions):
            ids = prompt_ids(tok, judge_prompt(p, c, self.instruction))
            rows.append(Example(ids, [0] * len(ids)))
        if not self.single:
            return self._whole_words([r.input_ids for r in rows], pad)
        out = []
        for i in range(0, len(rows), self.batch_size):
            b = collate(rows[i:i + self.batch_size], pad)
            last = b.attention_mask.sum(-1) - 1  # right padding: the verdict is predicted here
            hidden = hidden_at(self.model, torch.arange(len(last)), last, input_ids=b.input_ids,
                               attention_mask=b.attention_mask)  # the last layer only at that position
            logits = head_logits(self.model, hidden).float()
            logp = torch.log_softmax(logits, -1)
            yes, no = logp[:, self.yes_ids[0]], logp[:, self.no_ids[0]]
            out.append(yes - no if self.mode == "logratio" else yes.exp())
        return torch.cat(out) if out else torch.zeros(0)

    def _whole_words(self, prompts: list[list[int]], pad: int) -> torch.Tensor:
        """The verdict scores from log p(" yes" | x, y, I) and log p(" no" | x, y, I), each the sum over
        the word's tokens: both continuations of a prompt in one packed forward."""
        from .online import completion_logps  # the online trainers' packed forward over completions

        width = max(len(self.yes_ids), len(self.no_ids))
        words = torch.full((2, width), pad, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for j, ids in enumerate((self.yes_ids, self.no_ids)):
            words[j, :len(ids)], mask[j, :len(ids)] = torch.tensor(ids), 1
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            lp, _ = completion_logps(self.model, [p for p in chunk for _ in range(2)], words.repeat(len(chunk), 1),
                                     mask.repeat(len(chunk), 1), pad=pad, with_entropy=False)
            yes, no = lp.sum(-1).view(-1, 2).unbind(-1)
            out.append(yes - no if self.mode == "logratio" else yes.exp())
        return torch.cat(out) if out else torch.zeros(0)
