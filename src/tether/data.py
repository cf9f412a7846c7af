"""Data loading shared by every trainer: rows from JSONL files, ``datasets`` datasets or Python
lists; schema checks whose errors name the file and line; tokenization with a completion-only
loss mask; length filtering that is counted, never silent; sequence packing; collation.

Row schemas for SFT (one per row, detected by its keys):

* ``{"prompt": str, "completion": str}``: loss on the completion (and the EOS appended to it).
* ``{"messages": [{"role", "content"}, ...]}``: the chat template is applied; loss on every
  assistant turn.
* ``{"prompt": [messages], "completion": [messages]}``: conversational prompt/completion; loss on
  the completion turns.
* ``{"text": str}``: plain language modelling; loss on every token but the first.

Notation: ``B`` rows in a batch, ``T`` padded length.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

IGNORE = -100  # target id of positions without loss (torch's cross_entropy ignore_index)


class DataError(ValueError):
    """Bad input data; the message names the source and the row."""


@dataclass
class Row:
    where: str  # "file.jsonl:12" / "file.csv:12" (file lines, from 1) or "dataset row 12": what an error points at
    data: dict[str, Any]


@dataclass
class Example:
    """One tokenized sequence. ``loss_mask[t] = 1`` when token ``t`` is a training target."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class DataStats:
    rows: int = 0
    skipped_bad: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few messages, for the log

    def summary(self) -> str:
        parts = [f"{self.rows} rows"]
        if self.skipped_bad:
            parts.append(f"{self.skipped_bad} malformed rows skipped")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} rows longer than max_length dropped")
        if self.truncated:
            parts.append(f"{self.truncated} rows truncated to max_length")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------
def read_rows(source: str | Path | Sequence[dict] | Any, skip_bad_rows: bool | None = None,
              stats: DataStats | None = None) -> list[Row]:
    """Rows from a ``.jsonl`` file, a ``.csv`` file (every cell a string: :func:`_read_csv`), a folder
    written by ``datasets.save_to_disk``, any other file ``datasets.load_dataset`` reads (``.json``,
    ``.parquet``), a ``datasets.Dataset`` or a list of dicts. A row that is not a JSON object, or a
    CSV line with more cells than the header, is a :class:`DataError` naming file and line (or, with
    ``skip_bad_rows``, counted in ``stats`` and skipped; None where the caller has no such option)."""
    stats = stats if stats is not None else DataStats()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"data not found: {path}")
        if path.suffix == ".jsonl":
            return _read_jsonl(path, skip_bad_rows, stats)
        if path.suffix == ".csv" and path.is_file():
            return _read_csv(path, skip_bad_rows, stats)
        import datasets

        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
                ds = ds["train"]
        else:
            kind = {".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise DataError(f"{path}: unsupported data file (use .jsonl, .json, .parquet, .csv or a datasets folder)")
            try:
                ds = datasets.load_dataset(kind, data_files=str(path), split="train")
            except Exception as e:  # datasets' own errors (not UTF-8, not JSON…) carry the cause in a chain
                cause = e.__cause__ or e
                raise DataError(f"{path}: cannot be read as {kind}: {type(cause).__name__}: {cause}") from None
        # a table has every column in every row: a key a row did not have reads None, and it is left out, so
        # that rows of different kinds load as from JSONL
        return [Row(f"{path} row {i + 1}", {k: v for k, v in dict(r).items() if v is not None}) for i, r in enumerate(ds)]
    return [Row(f"row {i}", dict(r)) for i, r in enumerate(source)]


def _read_jsonl(path: Path, skip_bad_rows: bool | None, stats: DataStats) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is allowed
            except UnicodeDecodeError as e:
                _bad(stats, skip_bad_rows, f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                _bad(stats, skip_bad_rows, f"{where}: malformed row: {e}")
                continue
            rows.append(Row(where, obj))
    return rows


def _read_csv(path: Path, skip_bad_rows: bool | None, stats: DataStats) -> list[Row]:
    """Rows of a CSV file with a header line, every cell a string (an empty cell is ""; a line with
    fewer cells than the header has ``None`` for the missing ones). CSV cells are text: through
    ``datasets`` (pandas) a completion " 23" became the int 23, which SFT then refused as "not a
    string", and an answer "007" became 7. Errors name the file line as JSONL's do (``data.csv:2`` is
    the first row after the header line 1; a quoted cell may span lines: its row's first line)."""
    rows = []
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long completions and code: above the 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1  # where the next row begins
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # a broken quote: the rest of the file cannot be split into rows
                    raise DataError(f"{path}:{start}: malformed CSV: {e}") from None
                if not cells:  # a blank line
                    continue
                if header is None:  # an unnamed column (pandas' index) is named as pandas names it
                    header = [c or f"Unnamed: {i}" for i, c in enumerate(cells)]
                    twice = sorted({c for c in header if header.count(c) > 1})
                    if twice:
                        raise DataError(f"{path}:{start}: the header names column(s) {twice} more than once")
                    continue
                where = f"{path}:{start}"
                if len(cells) > len(header):
                    _bad(stats, skip_bad_rows, f"{where}: malformed row: {len(cells)} cells for {len(header)} columns")
                    continue
                rows.append(Row(where, dict(zip(header, cells + [None] * (len(header) - len(cells))))))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    finally:
        csv.field_size_limit(limit)
    return rows


def _bad(stats: DataStats, skip: bool | None, message: str) -> None:
    """Count and skip a malformed row, or stop at it; ``skip`` None: the caller has no
    ``skip_bad_rows`` option to suggest (evaluation files, the online trainers' prompts)."""
    if not skip:
        raise DataError(message if skip is None else message + " (set skip_bad_rows=true to skip and count such rows)")
    stats.skipped_bad += 1
    if len(stats.bad_examples) < 5:
        stats.bad_examples.append(message)


# ---------------------------------------------------------------------------------------------
# Tokenization for SFT
# ---------------------------------------------------------------------------------------------
def _default_bos(tokenizer) -> int | None:
    """The BOS id ``tokenizer`` puts before a text by default (Llama, Mistral, Gemma), else None (GPT-2,
    Qwen, the embedded tokenizer). Cached on the tokenizer: it is asked once per prompt."""
    if "_tether_bos" not in vars(tokenizer):
        bos = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
        tokenizer._tether_bos = bos if ids and ids[0] == bos else None
    return tokenizer._tether_bos


def render_chat(tokenizer, messages: list, where: str, add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` as the tokenizer's chat template renders them; a :class:`DataError`
    naming ``where`` (file:line) if there is no template or it cannot render them (a template's own
    ``raise_exception``, as Qwen's and Llama's use to refuse a role order, included)."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # transformers renders templates with jinja2; without it no template renders at all
        TemplateError = ValueError  # noqa: N806
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError, KeyError, TemplateError) as e:  # no template, or messages it cannot render
        raise DataError(f"{where}: chat messages cannot be rendered with this tokenizer's chat template: {e}") from None


def chat_prompt_text(tokenizer, messages: list, where: str) -> str:
    """A chat prompt's text: the messages rendered by the tokenizer's template with the assistant turn
    opened (what online RL samples from and evaluation greedily completes)."""
    return render_chat(tokenizer, messages, where, add_generation_prompt=True)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text that starts a sequence (a prompt, a plain-text row): led by the tokenizer's
    default BOS where it has one, as the model saw text in pretraining, and only once (a chat template
    that renders its BOS already has it). What follows (completions) is tokenized without special
    tokens. A Llama-family model fed prompts without their BOS samples and scores them off-distribution."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _default_bos(tokenizer)
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else list(ids)


def tokenize_sft(rows: Iterable[Row], tokenizer, max_length: int, overlong: Literal["drop", "truncate"] = "drop",
                 skip_bad_rows: bool = False, stats: DataStats | None = None) -> tuple[list[Example], DataStats]:
    """Tokenize SFT rows into examples with a completion-only loss mask (module docstring)."""
    stats = stats if stats is not None else DataStats()
    examples = []
    for row in rows:
        try:
            ex = _tokenize_row(row, tokenizer)
        except DataError as e:
            _bad(stats, skip_bad_rows, str(e))
            continue
        if len(ex.input_ids) > max_length:
            if overlong == "drop":
                stats.dropped_too_long += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.loss_mask[:max_length])
            if not any(ex.loss_mask):  # the cut left nothing to train on
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
        examples.append(ex)
    stats.rows = len(examples)
    if stats.dropped_too_long or stats.truncated or stats.skipped_bad:
        log.warning("data: %s", stats.summary())
    return examples, stats


def _tokenize_row(row: Row, tokenizer) -> Example:
    d = row.data
    eos = tokenizer.eos_token_id
    if "messages" in d:
        return _tokenize_chat(row, tokenizer, _check_messages(row, d["messages"], "messages"), trainable="assistant")
    if "prompt" in d and "completion" in d:
        prompt, completion = d["prompt"], d["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            msgs = _check_messages(row, prompt, "prompt") + [
                {**m, "_train": True} for m in _check_messages(row, completion, "completion")]
            return _tokenize_chat(row, tokenizer, msgs, trainable="flagged")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{row.where}: 'prompt' and 'completion' must both be strings (or both message lists)")
        if not completion.strip():
            raise DataError(f"{row.where}: empty completion")
        p = prompt_ids(tokenizer, prompt)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        return Example(p + c, [0] * len(p) + [1] * len(c))
    if "text" in d:
        if not isinstance(d["text"], str) or not d["text"].strip():
            raise DataError(f"{row.where}: 'text' must be a non-empty string")
        ids = prompt_ids(tokenizer, d["text"])
        if eos is not None:
            ids = ids + [eos]
        return Example(ids, [0] + [1] * (len(ids) - 1))  # the first token has no prediction
    keys = ", ".join(sorted(d)) or "none"
    raise DataError(f"{row.where}: row has keys ({keys}); expected prompt+completion, messages, or text")


def _check_messages(row: Row, msgs: Any, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{row.where}: '{key}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.where}: {key}[{i}] must be an object with string 'role' and 'content'")
    return [dict(m) for m in msgs]


def _tokenize_chat(row: Row, tokenizer, msgs: list[dict], trainable: str) -> Example:
    """Apply the chat template and mark the characters of trainable turns, then map them to tokens
    through the offsets (robust to merges across turn boundaries)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.where}: chat 'messages' given but the tokenizer has no chat template")
    clean = [{k: v for k, v in m.items() if not k.startswith("_")} for m in msgs]
    spans = []
    for i, m in enumerate(msgs):
        train = m.get("_train", False) if trainable == "flagged" else m["role"] == "assistant"
        if not train:
            continue
        if not m["content"].strip():  # as an empty text completion: nothing to learn but the end of the turn
            raise DataError(f"{row.where}: empty {m['role']} turn to train on (message {i})")
        before = render_chat(tokenizer, clean[:i], row.where, add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, clean[: i + 1], row.where)
        if not upto.startswith(before):
            before = render_chat(tokenizer, clean[:i], row.where) if i else ""
            if not upto.startswith(before):
                raise DataError(f"{row.where}: the chat template does not render turns as prefixes; cannot locate turn {i}")
        spans.append((len(before), len(upto)))
    if not spans:
        raise DataError(f"{row.where}: no assistant/completion turn to train on")
    text = render_chat(tokenizer, clean, row.where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    bos = _default_bos(tokenizer)
    if bos is not None and ids[0] != bos:  # led by the default BOS once, as prompt_ids leads every other sequence
        ids, mask = [bos, *ids], [0, *mask]
    mask[0] = 0
    # No EOS is appended: the template's own end-of-turn token ends each trained turn.
    return Example(ids, mask)


# ---------------------------------------------------------------------------------------------
# Packing and collation
# ---------------------------------------------------------------------------------------------
@dataclass
class Packed:
    """Several examples in one row; ``position_ids`` restart at 0 at each example so attention
    stays within it (transformers builds a block-causal mask from them when no attention mask is
    given)."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]


def pack(examples: Sequence[Example], max_length: int) -> list[Packed]:
    """Greedy, order-keeping packing into rows of at most ``max_length`` tokens."""
    packs: list[Packed] = []
    cur = Packed([], [], [])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_length:
            packs.append(cur)
            cur = Packed([], [], [])
        cur.input_ids += ex.input_ids
        cur.loss_mask += ex.loss_mask
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        packs.append(cur)
    return packs


@dataclass
class TokenBatch:
    """A padded batch (right padding).

    input_ids: (B, T) token ids, padding filled with ``pad_id``.
    targets: (B, T) the id that position t must predict (token t+1), or ``IGNORE``.
    attention_mask: (B, T) 1 on real tokens.
    position_ids: (B, T) for packed rows (restarting at each example), else None. When present
        the model gets no attention mask: the position ids carry the example boundaries.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(items: Sequence[Example | Packed], pad_id: int) -> TokenBatch:
    """Right-pad ``items`` into a :class:`TokenBatch`. Masks come from lengths, never from
    comparing ids to ``pad_id``, so a tokenizer whose pad is its EOS still trains on EOS."""
    B, T = len(items), max(len(x.input_ids) for x in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    packed = isinstance(items[0], Packed)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    for i, x in enumerate(items):
        n = len(x.input_ids)
        ids = torch.tensor(x.input_ids, dtype=torch.long)
        mask = torch.tensor(x.loss_mask, dtype=torch.bool)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        # position t predicts token t+1: a target exists where the *next* token is trained on.
        targets[i, : n - 1] = torch.where(mask[1:], ids[1:], IGNORE)
        if position_ids is not None:
            position_ids[i, :n] = torch.tensor(x.position_ids, dtype=torch.long)  # type: ignore[union-attr]
            position_ids[i, n:] = torch.arange(T - n)  # the padding is a segment of its own
    return TokenBatch(input_ids, targets, attention_mask, position_ids)


class EpochSampler:
    """Shuffled passes over ``n`` items; batches run on across epoch boundaries (no short or
    dropped batch). Its state (epoch, position, this epoch's permutation and the generator) is
    saved in checkpoints, so a resumed run draws exactly the batches the uninterrupted run would."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise DataError("no training examples left after filtering")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = torch.randperm(n, generator=self.generator)

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch += 1
                self.pos = 0
                self.perm = torch.randperm(self.n, generator=self.generator)
            take = min(k - len(out), self.n - self.pos)
            out += self.perm[self.pos:self.pos + take].tolist()
            self.pos += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "epoch": self.epoch, "pos": self.pos, "perm": self.perm.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise DataError(f"the data changed since the checkpoint: {self.n} examples now, {state['n']} then")
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], state["perm"]
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------
@dataclass
class PairExample:
    """One tokenized preference pair: the shared prompt and both completions (each ends in EOS)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float | None = None  # the row's 'margin' (how much better chosen is; reward models), if it has one

    def rows(self) -> tuple[Example, Example]:
        p = [0] * len(self.prompt)
        return (Example(self.prompt + self.chosen, p + [1] * len(self.chosen)),
                Example(self.prompt + self.rejected, p + [1] * len(self.rejected)))


def _split_prompt(row: Row) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a row. A row without ``prompt`` has the part chosen and rejected
    share split off as the prompt, as TRL's ``extract_prompt`` does: the leading messages of a
    conversation, or the longest common prefix of two texts (HH-RLHF's "\n\nHuman: …\n\nAssistant:"),
    a space at its end left to the completions."""
    d = row.data
    missing = [k for k in ("chosen", "rejected") if k not in d]
    if missing:
        raise DataError(f"{row.where}: preference row without '{missing[0]}' (keys: {', '.join(sorted(d))})")
    chosen, rejected = d["chosen"], d["rejected"]
    if "prompt" in d:
        return d["prompt"], chosen, rejected
    if isinstance(chosen, list) and isinstance(rejected, list):
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise DataError(f"{row.where}: chosen and rejected share no leading messages to use as the prompt")
        return chosen[:k], chosen[k:], rejected[k:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = len(os.path.commonprefix([chosen, rejected]))
        if k in (len(chosen), len(rejected)):
            raise DataError(f"{row.where}: no 'prompt', and one of chosen and rejected starts the other: "
                            "no completion is left to split off")
        if k and chosen[k - 1] == " ":
            k -= 1
        if k == 0:
            raise DataError(f"{row.where}: no 'prompt', and chosen and rejected share no beginning to use as one")
        return chosen[:k], chosen[k:], rejected[k:]
    raise DataError(f"{row.where}: preference row without 'prompt'")


def _completion_text(row: Row, tokenizer, prompt: Any, completion: Any, key: str) -> tuple[str, str]:
    """(prompt text, completion text); chat turns are rendered with the tokenizer's template."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    if isinstance(prompt, list) and isinstance(completion, list):
        msgs_p = _check_messages(row, prompt, "prompt")
        msgs_c = _check_messages(row, completion, key)
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{row.where}: chat messages given but the tokenizer has no chat template")
        p = render_chat(tokenizer, msgs_p, row.where, add_generation_prompt=True)
        full = render_chat(tokenizer, msgs_p + msgs_c, row.where)
        if not full.startswith(p):
            raise DataError(f"{row.where}: the chat template does not render the prompt as a prefix")
        return p, full[len(p):]
    raise DataError(f"{row.where}: 'prompt' and '{key}' must both be strings or both message lists")


def tokenize_pairs(rows: Iterable[Row], tokenizer, max_length: int, skip_bad_rows: bool = False,
                   stats: DataStats | None = None) -> tuple[list[PairExample], DataStats]:
    """Tokenize preference rows. Prompt and completions are tokenized separately (the way the
    model meets them when it generates), EOS appended to plain-text completions. Pairs longer
    than ``max_length`` are dropped and counted; a missing field, an empty completion or
    chosen == rejected is a :class:`DataError` (or a counted skip)."""
    stats = stats if stats is not None else DataStats()
    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        try:
            prompt, chosen, rejected = _split_prompt(row)
            p_text, c_text = _completion_text(row, tokenizer, prompt, chosen, "chosen")
            _, r_text = _completion_text(row, tokenizer, prompt, rejected, "rejected")
            if not c_text.strip() or not r_text.strip():
                raise DataError(f"{row.where}: empty {'chosen' if not c_text.strip() else 'rejected'} completion")
            if c_text == r_text:
                raise DataError(f"{row.where}: chosen and rejected are identical")
            margin = row.data.get("margin")
            if margin is not None:
                try:
                    margin = float(margin)
                except (TypeError, ValueError):
                    raise DataError(f"{row.where}: 'margin' must be a number, got {margin!r}") from None
        except DataError as e:
            _bad(stats, skip_bad_rows, str(e))
            continue
        p = prompt_ids(tokenizer, p_text)
        cr = []
        for text in (c_text, r_text):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if isinstance(chosen, str) and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            cr.append(ids)
        if len(p) + max(len(cr[0]), len(cr[1])) > max_length:
            stats.dropped_too_long += 1
            continue
        out.append(PairExample(p, cr[0], cr[1], margin))
    stats.rows = len(out)
    if stats.dropped_too_long or stats.skipped_bad:
        log.warning("data: %s", stats.summary())
    return out, stats


def longest_pair(pairs: Sequence[PairExample]) -> int:
    """The most positions any sequence of ``pairs`` spans: prompt plus the longer completion."""
    return max((len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs), default=0)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists, leaving each at least one token."""
    k, n = 0, min(len(a), len(b)) - 1
    while k < n and a[k] == b[k]:
        k += 1
    return k


@dataclass
class PairBatch:
    """Preference pairs packed one per row as ``prompt + shared + chosen tail + rejected tail``,
    where ``shared`` is the longest common token prefix of the two completions. Under a causal
    model the hidden states of that context do not depend on what follows, so it is computed once
    for both completions; the rejected tail sees the context but not the chosen tail, and continues
    the context's positions, so each completion is scored exactly as if it were alone.

    input_ids, position_ids: (B, T). allowed: (B, T, T) bool, query × key attention.
    logit_pos: (m,) flat indices b*T + t of the positions whose next token is a completion token
    (each once, even where it predicts a token of both completions).
    src, tgt, seq, tok: (n,) one entry per completion token: its row of ``logit_pos``, the token,
    its sequence (pair b's chosen is b, its rejected B + b) and its index in the completion.
    chosen_last, rejected_last: (B,) flat index of each completion's last token (its EOS).
    lengths: (2B,) completion lengths, chosen then rejected.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    logit_pos: torch.Tensor
    src: torch.Tensor
    tgt: torch.Tensor
    seq: torch.Tensor
    tok: torch.Tensor
    chosen_last: torch.Tensor
    rejected_last: torch.Tensor
    lengths: torch.Tensor
    n_tokens: int


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> PairBatch:
    B = len(pairs)
    shared = [common_prefix(p.chosen, p.rejected) for p in pairs]
    T = max(len(p.prompt) + len(p.chosen) + len(p.rejected) - s for p, s in zip(pairs, shared))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # 0 context, 1 chosen tail, 2 rejected tail, -1 padding
    pos: list[int] = []
    src, tgt, seq, tok, c_last, r_last = ([] for _ in range(6))
    for b, (p, S) in enumerate(zip(pairs, shared)):
        L = len(p.prompt) + S  # the context both completions continue
        C, R = len(p.chosen) - S, len(p.rejected) - S  # tail lengths, each >= 1
        input_ids[b, :L + C + R] = torch.tensor(p.prompt + p.chosen + p.rejected[S:])
        position_ids[b, :L + C] = torch.arange(L + C)
        position_ids[b, L + C:L + C + R] = torch.arange(L, L + R)
        segment[b, :L], segment[b, L:L + C], segment[b, L + C:L + C + R] = 0, 1, 2
        base, m = b * T, len(pos)
        # Rows of logit_pos for this pair: context positions L-S-1 .. L-1 (the last one predicts the
        # first token of both tails), then the chosen tail's and the rejected tail's own positions.
        pos += [base + L - S - 1 + i for i in range(S + 1)]
        pos += [base + L + i for i in range(C - 1)] + [base + L + C + i for i in range(R - 1)]
        for ids, sid, tail0 in ((p.chosen, b, m + S + 1), (p.rejected, B + b, m + S + C)):
            src += [m + i for i in range(S + 1)] + [tail0 + i for i in range(len(ids) - S - 1)]
            tgt += ids
            seq += [sid] * len(ids)
            tok += range(len(ids))
        c_last.append(base + L + C - 1)
        r_last.append(base + L + C + R - 1)
    idx = torch.arange(T)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, T, T) query ≥ key
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (q >= 0) & (k >= 0) & ~((q == 2) & (k == 1))
    allowed |= torch.eye(T, dtype=torch.bool)[None] & (q < 0)  # padding attends to itself (no empty rows)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    lengths = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    return PairBatch(input_ids, position_ids, allowed, t(pos), t(src), t(tgt), t(seq), t(tok), t(c_last), t(r_last),
                     t(lengths), int((segment >= 0).sum()))
