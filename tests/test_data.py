import copy
import json

import pytest
import torch

from tether.data import IGNORE, DataError, DataStats, EpochSampler, collate, pack, read_rows, tokenize_sft
from tether.modeling import load_causal_lm, target_logits


def rows_of(*dicts):
    return read_rows(list(dicts))


def test_completion_only_mask_excludes_prompt_tokens(tokenizer):
    prompt, completion = "Question: What is 3 + 4?\nAnswer:", " 3 + 4 = 7"
    (ex,), _ = tokenize_sft(rows_of({"prompt": prompt, "completion": completion}), tokenizer, 128)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.loss_mask == [0] * len(p) + [1] * len(c)
    batch = collate([ex], tokenizer.pad_token_id)
    trained = batch.targets[batch.targets != IGNORE].tolist()
    assert trained == c  # exactly the completion and its EOS are predicted, no prompt token


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model, tmp_path_factory):
    """The tiny tokenizer made to lead every text with a BOS by default, as Llama's, Mistral's and
    Gemma's do (here ``<|im_start|>``), saved and reloaded as a user's checkpoint would be."""
    from tokenizers.processors import TemplateProcessing

    from tether.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.bos_token = "<|im_start|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", tok.bos_token_id)])
    out = tmp_path_factory.mktemp("bos")
    tok.save_pretrained(out)
    return load_tokenizer(out)


def test_sequences_start_with_the_tokenizers_default_bos_once(bos_tokenizer, tokenizer):
    """Prompts and plain-text rows lead with the BOS a Llama-family tokenizer adds by default (a model
    scores text without it off-distribution), once even where the text renders it already; completions
    never get one; a tokenizer without a default BOS (the embedded one) is left as it is."""
    from tether.data import prompt_ids, tokenize_pairs
    from tether.evaluate import engine_texts

    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    prompt, completion = "Question: What is 3 + 4?\nAnswer:", " 3 + 4 = 7"
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, prompt) == [bos] + plain
    assert prompt_ids(tok, "<|im_start|>" + prompt) == [bos] + plain
    assert prompt_ids(tokenizer, prompt) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    (ex,), _ = tokenize_sft(rows_of({"prompt": prompt, "completion": completion}), tok, 128)
    assert ex.input_ids[:len(plain) + 1] == [bos] + plain and ex.input_ids.count(bos) == 1
    assert ex.loss_mask[:len(plain) + 1] == [0] * (len(plain) + 1)
    (text,), _ = tokenize_sft(rows_of({"text": "3 + 4 = 7"}), tok, 128)
    assert text.input_ids[0] == bos and text.loss_mask[:2] == [0, 1]
    (pair,), _ = tokenize_pairs(rows_of({"prompt": prompt, "chosen": " 7", "rejected": " 8"}), tok, 128)
    assert pair.prompt[0] == bos and bos not in pair.chosen + pair.rejected

    class Engine:  # what the rollout engine is handed for evaluation and RL prompts
        def generate(self, ids, params):
            self.ids = ids
            return type("R", (), {"texts": [""] * len(ids)})()

    engine = Engine()
    engine_texts(engine, tok, [prompt, prompt], None)
    assert engine.ids == [[bos] + plain] * 2


def test_chat_rows_lead_with_the_default_bos_in_every_trainer(tiny_model, tmp_path):
    """A tokenizer that adds a BOS by default and a chat template that does not render one (Zephyr's,
    TinyLlama-chat's): an SFT chat row, a DPO chat prompt and an RL or evaluation chat prompt all start
    with the same tokens, the BOS once, then the rendered prompt. SFT's chat rows lacked the BOS."""
    from tokenizers.processors import TemplateProcessing

    from tether.data import chat_prompt_text, prompt_ids, tokenize_pairs
    from tether.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(tmp_path)
    tok, user = load_tokenizer(tmp_path), [{"role": "user", "content": "What is 2 + 2?"}]
    bos = tok.bos_token_id
    (ex,), _ = tokenize_sft(rows_of({"messages": [*user, {"role": "assistant", "content": "4"}]}), tok, 128)
    (pair,), _ = tokenize_pairs(rows_of({"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
                                         "rejected": [{"role": "assistant", "content": "5"}]}), tok, 128)
    rl = prompt_ids(tok, chat_prompt_text(tok, user, "row"))
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1 and ex.loss_mask[0] == 0
    assert ex.input_ids[:len(rl)] == rl == pair.prompt
    assert tok.decode(ex.input_ids[len(rl):]) == "4<|im_end|>\n"


def test_an_empty_turn_to_train_on_is_refused_as_an_empty_completion_is(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": " "}]
    with pytest.raises(DataError, match="empty assistant turn"):
        tokenize_sft(rows_of({"messages": msgs}), tokenizer, 128)
    with pytest.raises(DataError, match="empty completion"):
        tokenize_sft(rows_of({"prompt": "What is 2 + 2?", "completion": " "}), tokenizer, 128)


def test_chat_messages_train_on_assistant_turns_only(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]
    (ex,), _ = tokenize_sft(rows_of({"messages": msgs}), tokenizer, 128)
    trained = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "4<|im_end|>\n6<|im_end|>\n"
    # conversational prompt/completion: loss on the completion turn only
    (ex2,), _ = tokenize_sft(rows_of({"prompt": msgs[:3], "completion": msgs[3:]}), tokenizer, 128)
    assert tokenizer.decode([t for t, m in zip(ex2.input_ids, ex2.loss_mask) if m]) == "6<|im_end|>\n"


def test_a_template_that_refuses_the_messages_names_the_row(tmp_path, tokenizer):
    """A chat template's own raise_exception (Qwen's and Llama's refuse some role orders) is a data error
    naming the row, in SFT and preference rows alike, and skip_bad_rows skips the row."""
    from tether.data import tokenize_pairs

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                         "messages') }}{% endif %}{{ m['content'] }}{% endfor %}")
    f = tmp_path / "chat.jsonl"
    sys_msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2?"}]
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]})
                 + "\n" + json.dumps({"messages": sys_msgs + [{"role": "assistant", "content": "4"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: chat messages cannot be rendered.*no system messages"):
        tokenize_sft(read_rows(f), tok, 64)
    examples, stats = tokenize_sft(read_rows(f), tok, 64, skip_bad_rows=True)
    assert len(examples) == 1 and stats.skipped_bad == 1
    g = tmp_path / "pairs.jsonl"
    g.write_text(json.dumps({"prompt": sys_msgs, "chosen": [{"role": "assistant", "content": "4"}],
                             "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: chat messages cannot be rendered"):
        tokenize_pairs(read_rows(g), tok, 64)


def test_malformed_jsonl_row_names_file_and_line(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2") as e:
        read_rows(f)  # as the online trainers and evaluation files read: no skip_bad_rows to suggest
    assert "skip_bad_rows" not in str(e.value)
    with pytest.raises(DataError, match=r"d\.jsonl:2.*set skip_bad_rows=true"):
        read_rows(f, skip_bad_rows=False)  # as the offline trainers read their data
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"e\.jsonl:3.*keys \(prompt\)"):
        tokenize_sft(read_rows(g), tokenizer, 64)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": "a", "completion": " b"}), "[1, 2]", "{oops",
             json.dumps({"prompt": "a", "completion": ""}), json.dumps({"text": "hello there"})]
    f.write_text("\n".join(lines) + "\n")
    stats = DataStats()
    exs, stats = tokenize_sft(read_rows(f, skip_bad_rows=True, stats=stats), tokenizer, 64, skip_bad_rows=True,
                              stats=stats)
    assert len(exs) == 2 and stats.skipped_bad == 3 and stats.rows == 2


def test_overlong_rows_are_dropped_and_counted_or_truncated(tokenizer):
    rows = rows_of({"prompt": "Q:", "completion": " short"}, {"prompt": "Q:", "completion": " word" * 50})
    exs, stats = tokenize_sft(rows, tokenizer, 20)
    assert len(exs) == 1 and stats.dropped_too_long == 1
    exs, stats = tokenize_sft(rows, tokenizer, 20, overlong="truncate")
    assert len(exs) == 2 and stats.truncated == 1 and max(len(e.input_ids) for e in exs) == 20


def test_tokenizer_without_pad_keeps_real_eos_in_the_loss(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    rows = rows_of({"prompt": "Q: 1 + 1?", "completion": " 2"}, {"prompt": "Q: 10 + 10?", "completion": " 10 + 10 = 20"})
    exs, _ = tokenize_sft(rows, tok, 64)
    batch = collate(exs, tok.eos_token_id)  # what the trainer does without a pad token
    eos = tok.eos_token_id
    for i, ex in enumerate(exs):
        n = len(ex.input_ids)
        assert batch.targets[i, n - 2] == eos  # the last real position predicts EOS
        assert (batch.targets[i, n - 1:] == IGNORE).all()  # padding (also EOS ids) is never a target
    assert batch.attention_mask.sum().item() == sum(len(e.input_ids) for e in exs)


def test_datasets_folder_is_read(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "Q:", "completion": " a"}, {"prompt": "Q:", "completion": " b"}])
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds")
    assert [r.data["completion"] for r in rows] == [" a", " b"]
    assert tokenize_sft(rows, tokenizer, 32)[1].rows == 2


def test_packing_has_no_cross_contamination(tiny_model, tokenizer):
    model = load_causal_lm(tiny_model).eval()
    rows = rows_of(*[{"prompt": f"Question: What is {a} + {a}?\nAnswer:", "completion": f" {a} + {a} = {2 * a}"}
                     for a in (3, 41, 7, 88)])
    exs, _ = tokenize_sft(rows, tokenizer, 128)
    packs = pack(exs, 64)
    assert len(packs) < len(exs)  # something was actually packed together
    with torch.no_grad():
        packed_logits, packed_targets = target_logits(model, collate(packs, tokenizer.pad_token_id))
        single = [target_logits(model, collate([e], tokenizer.pad_token_id)) for e in exs]
    ref_logits = torch.cat([lg for lg, _ in single])
    assert torch.equal(packed_targets, torch.cat([t for _, t in single]))
    torch.testing.assert_close(packed_logits, ref_logits, atol=1e-5, rtol=1e-5)
    # without the position-id reset the second example would see the first: the check can fail
    with torch.no_grad():
        b = collate(packs, tokenizer.pad_token_id)
        b.position_ids = None
        leaky, _ = target_logits(model, b)
    assert not torch.allclose(leaky, ref_logits, atol=1e-3)


def test_sampler_covers_each_epoch_and_resumes_exactly():
    s = EpochSampler(10, seed=3)
    first = s.next(7)
    state = s.state_dict()
    rest = s.next(13)
    assert sorted(first + rest[:3]) == list(range(10))  # epoch 0 is a permutation
    t = EpochSampler(10, seed=3)
    t.load_state_dict(state)
    assert t.next(13) == rest


def test_csv_cells_stay_text(tmp_path, tokenizer):
    """A CSV cell is text: a completion " 23" and an answer "007" stay the strings they are (through
    ``datasets`` they became the ints 23 and 7, and SFT refused the row as "not a string"); quoted
    cells keep their commas and newlines; an empty cell is ""."""
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion,answer,note\n"What is 20 + 3?\nAnswer:", 23,007,\n"Q: 1, 2 or 3?", 3,3,x\n')
    rows = read_rows(f)
    assert [r.data for r in rows] == [
        {"prompt": "What is 20 + 3?\nAnswer:", "completion": " 23", "answer": "007", "note": ""},
        {"prompt": "Q: 1, 2 or 3?", "completion": " 3", "answer": "3", "note": "x"}]
    exs, stats = tokenize_sft(rows, tokenizer, 64)
    assert stats.rows == 2
    trained = exs[0].input_ids[exs[0].loss_mask.index(1):]  # the completion and its EOS
    assert trained == tokenizer(" 23", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_csv_errors_name_the_file_line(tmp_path, tokenizer):
    """CSV errors point at the file's line as JSONL's do (header line 1, first row line 2; a row whose
    quoted cell spans lines is named by its first line), not a 0-based row index."""
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\nQ:, a\n"multi\nline",\nQ:, b\n')
    with pytest.raises(DataError, match=r"d\.csv:3: empty completion"):
        tokenize_sft(read_rows(f), tokenizer, 64)
    g = tmp_path / "e.csv"
    g.write_text('prompt,completion\nQ:, a\n\nQ:, b, extra\nQ:, c\n')
    with pytest.raises(DataError, match=r"e\.csv:4: malformed row: 3 cells for 2 columns"):
        read_rows(g)
    stats = DataStats()
    assert [r.where for r in read_rows(g, skip_bad_rows=True, stats=stats)] == [f"{g}:2", f"{g}:5"]
    assert stats.skipped_bad == 1


def test_text_pairs_without_a_prompt_split_off_their_common_beginning(tokenizer):
    """HH-RLHF's format: chosen and rejected repeat the dialogue; the shared beginning is the prompt,
    a trailing space left to the completions (TRL's extract_prompt), the same pair as an explicit prompt."""
    from tether.data import DataError, tokenize_pairs

    head = "\n\nHuman: What is 3 + 4?\n\nAssistant:"
    (implicit,), _ = tokenize_pairs(rows_of({"chosen": head + " It is 7.", "rejected": head + " It is 8."}), tokenizer, 128)
    (explicit,), _ = tokenize_pairs(rows_of({"prompt": head + " It is", "chosen": " 7.", "rejected": " 8."}), tokenizer, 128)
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == (explicit.prompt, explicit.chosen, explicit.rejected)
    with pytest.raises(DataError, match="share no beginning"):
        tokenize_pairs(rows_of({"chosen": "yes", "rejected": "no"}), tokenizer, 128)
    with pytest.raises(DataError, match="starts the other"):
        tokenize_pairs(rows_of({"chosen": "It is 7", "rejected": "It is 7."}), tokenizer, 128)


def test_table_files_with_rows_of_different_kinds_load_as_jsonl_does(tmp_path):
    """A .json or .parquet table has every column in every row, missing ones as None: those are left
    out, so rows of different kinds (with and without a prompt) load as they do from JSONL."""
    import datasets

    rows = [{"prompt": "Q: 1 + 1?", "chosen": " 2", "rejected": " 3"}, {"chosen": "1 + 1 = 2", "rejected": "1 + 1 = 3"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    want = [r.data for r in read_rows(tmp_path / "p.jsonl")]
    for name in ("p.json", "p.parquet"):
        got = read_rows(tmp_path / name)
        assert [r.data for r in got] == want, name
        assert got[0].where.endswith("row 1")  # rows counted from 1, as lines are


def test_files_that_are_not_utf8_are_named_with_their_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n')
    assert read_rows(tmp_path / "bom.jsonl")[0].data == {"text": "ok"}  # a byte-order mark, as CSV accepts
    (tmp_path / "broken.json").write_text('[{"text": "ok"},')
    with pytest.raises(DataError, match=r"broken\.json: cannot be read as json"):
        read_rows(tmp_path / "broken.json")


def test_margins_travel_with_their_pairs(tokenizer):
    """A reward model's 'margin' column: kept per pair through the drops, every row's or none."""
    from tether.data import tokenize_pairs
    from tether.reward import _margins

    long = " 1" * 200
    pairs, stats = tokenize_pairs(rows_of({"prompt": "Q:", "chosen": " 2", "rejected": " 3", "margin": 1.5},
                                          {"prompt": "Q:", "chosen": long, "rejected": " 3", "margin": 9},
                                          {"prompt": "Q:", "chosen": " 4", "rejected": " 5", "margin": "0.5"}), tokenizer, 64)
    assert stats.dropped_too_long == 1 and _margins(pairs).tolist() == [1.5, 0.5]
    pairs, _ = tokenize_pairs(rows_of({"prompt": "Q:", "chosen": " 2", "rejected": " 3"},
                                      {"prompt": "Q:", "chosen": " 4", "rejected": " 5", "margin": 2}), tokenizer, 64)
    with pytest.raises(DataError, match="1 of 2 preference rows have no 'margin'"):
        _margins(pairs)
    with pytest.raises(DataError, match="'margin' must be a number"):
        tokenize_pairs(rows_of({"prompt": "Q:", "chosen": " 2", "rejected": " 3", "margin": "lots"}), tokenizer, 64)


def test_a_tie_ranks_half_right():
    from tether.preference import ranked_share

    assert ranked_share(torch.zeros(8)) == 0.5  # DPO before its first step: policy and reference are one model
    assert ranked_share(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
