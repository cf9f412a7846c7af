"""The rollout engine: its log-probs are the trainer's, greedy is greedy, stops stop."""

import pytest
import torch

from tether.modeling import load_causal_lm
from tether.rollout import SamplingParams, TorchEngine, filter_logits, sample


@pytest.fixture(scope="module")
def lm(embedded_model):
    torch.manual_seed(0)
    return load_causal_lm(embedded_model).eval()


@pytest.fixture(scope="module")
def etok(embedded_model):
    from tether.modeling import load_tokenizer

    return load_tokenizer(embedded_model)


def prompts(tok, k=4):
    texts = ["Question: What is 3 + 4?\nAnswer:", "Question: What is 12 * 11?\nAnswer:",
             "Question: What is 49 - 17?\nAnswer:", "The cat"][:k]
    return [tok(t)["input_ids"] for t in texts]


def full_forward_logps(model, prompt_ids, completion, temperature=1.0):
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_full_forward(lm, etok, temperature):
    engine = TorchEngine(lm, etok, seed=3)
    r = engine.generate(prompts(etok), SamplingParams(max_new_tokens=12, temperature=temperature, n=3))
    assert r.completion_ids.shape[0] == 12 and len(r.texts) == 12
    for i in range(12):
        k = int(r.mask[i].sum())
        assert k >= 1
        comp = r.completion_ids[i, :k].tolist()
        want = full_forward_logps(lm, r.prompt_ids[i], comp, temperature)
        torch.testing.assert_close(r.logprobs[i, :k], want, atol=2e-5, rtol=1e-5)
        assert (r.logprobs[i, k:] == 0).all() and (r.completion_ids[i, k:] == etok.pad_token_id).all()
        if not r.truncated[i]:
            assert comp[-1] == etok.eos_token_id  # stopped rows end with EOS, inside the mask
        else:
            assert k == 12


def test_temperature_to_zero_is_greedy(lm, etok):
    ps = prompts(etok)
    greedy = TorchEngine(lm, etok).generate(ps, SamplingParams(max_new_tokens=10, temperature=0))
    cold = TorchEngine(lm, etok, seed=7).generate(ps, SamplingParams(max_new_tokens=10, temperature=1e-4))
    assert torch.equal(greedy.completion_ids, cold.completion_ids)
    for i, p in enumerate(ps):  # and greedy is transformers' greedy
        hf = lm.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, pad_token_id=etok.pad_token_id)
        k = int(greedy.mask[i].sum())
        assert hf[0, len(p):len(p) + k].tolist() == greedy.completion_ids[i, :k].tolist()


def test_same_seed_same_samples_and_resume_of_the_rng(lm, etok):
    ps, sp = prompts(etok), SamplingParams(max_new_tokens=8, n=2)
    a = TorchEngine(lm, etok, seed=1)
    state = a.state_dict()
    first = a.generate(ps, sp)
    b = TorchEngine(lm, etok, seed=999)
    b.load_state_dict(state)
    assert torch.equal(b.generate(ps, sp).completion_ids, first.completion_ids)
    assert not torch.equal(a.generate(ps, sp).completion_ids, first.completion_ids)  # the stream moves on


def test_stop_strings_end_the_completion(lm, etok):
    stop = ("=", " is")
    free = TorchEngine(lm, etok).generate(prompts(etok, 3), SamplingParams(max_new_tokens=12, temperature=0))
    r = TorchEngine(lm, etok).generate(prompts(etok, 3), SamplingParams(max_new_tokens=12, temperature=0, stop=stop))
    hits = 0
    for text, unstopped in zip(r.texts, free.texts):
        if any(s in unstopped for s in stop):  # it stops at the first one, which it keeps
            first = min(unstopped.find(s) + len(s) for s in stop if s in unstopped)
            assert text == unstopped[:first], (text, unstopped)
            hits += 1
        else:
            assert text == unstopped
    assert hits >= 2


def test_the_generation_configs_end_tokens_stop_as_generate_stops(embedded_model, etok):
    """A chat model ends its turns with a token of its own (Llama 3's <|eot_id|>, Qwen's <|im_end|>),
    listed in its generation config's eos_token_id beside the tokenizer's EOS: the engine stops there,
    the token kept and the row not truncated, where transformers' ``generate`` stops."""
    model = load_causal_lm(embedded_model).eval()
    ps = prompts(etok, 3)
    free = TorchEngine(model, etok).generate(ps, SamplingParams(max_new_tokens=12, temperature=0))
    end_of_turn = int(free.completion_ids[0, 2])  # a token greedy decoding emits third in the first row
    model.generation_config.eos_token_id = [etok.eos_token_id, end_of_turn]
    r = TorchEngine(model, etok).generate(ps, SamplingParams(max_new_tokens=12, temperature=0))
    for i, p in enumerate(ps):
        want = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):]
        got = r.completion_ids[i, :int(r.mask[i].sum())]
        assert got.tolist() == want.tolist()
    assert int(r.mask[0].sum()) == 3 and not bool(r.truncated[0])


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    # sampling follows the distribution and never picks a filtered token
    g = torch.Generator().manual_seed(0)
    draws = sample(filter_logits(logits.expand(20000, 4), top_k=3), g)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)
    # rows that share one distribution (completions with the same history) each draw their own token
    shared = sample(filter_logits(logits, top_k=3), g, rows=torch.zeros(20000, dtype=torch.long))
    freq = torch.bincount(shared, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)


def test_min_p_keeps_the_tokens_near_the_likeliest():
    """min-p keeps p ≥ min_p · max p, on any row's scale (logits shifted by a constant, the same),
    before top-k/top-p as vLLM orders them; the likeliest token always stays."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
    assert torch.isfinite(filter_logits(logits, min_p=0.35)).tolist() == [[True, True, False, False],
                                                                           [False, False, False, True]]
    assert torch.isfinite(filter_logits(logits + 7.0, min_p=0.2)).tolist() == [[True, True, True, False],
                                                                                [False, False, False, True]]
    assert torch.isfinite(filter_logits(logits, min_p=0.05)).tolist() == [[True, True, True, True],
                                                                          [True, True, True, True]]
    assert torch.isfinite(filter_logits(logits, min_p=0.99)).sum(-1).tolist() == [1, 1]
    # top-p over what min-p kept, renormalised: 0.5 / 0.95 ≥ 0.5 alone reaches top_p=0.5
    assert torch.isfinite(filter_logits(logits[:1], top_p=0.5, min_p=0.2)).tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = sample(filter_logits(logits[:1].expand(20000, 4), min_p=0.25), g)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)


def test_rows_sharing_a_distribution_draw_what_each_row_would_alone():
    """``sample(logits, g, rows)`` draws exactly the tokens of ``sample(logits[rows], g)`` (rows of
    any node in any order, nodes with no row), without copying the distribution per row."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    rows = torch.tensor([4, 0, 4, 2, 0, 4, 5, 4, 2, 0, 0, 4])  # nodes 1 and 3 have none
    for seed in range(5):
        grouped = sample(logits, torch.Generator().manual_seed(seed), rows)
        alone = sample(logits[rows], torch.Generator().manual_seed(seed))
        assert torch.equal(grouped, alone)
    assert len(set(sample(logits, torch.Generator().manual_seed(0), rows).tolist())) > 3  # not all one token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completions_with_the_same_history_share_one_forward(lm, etok, temperature):
    """The engine feeds each distinct (prompt, tokens so far) once per step: the count it reports is
    that of the distinct live prefixes of its own output, fewer than the rows whenever completions of
    a prompt agree (greedy: all n of them)."""
    n = 4
    r = TorchEngine(lm, etok, seed=5).generate(prompts(etok), SamplingParams(max_new_tokens=10, temperature=temperature, n=n))
    ids, lengths = r.completion_ids.tolist(), r.mask.sum(-1).tolist()
    distinct = rows = 0
    for t in range(int(r.stats["gen_steps"]) - 1):  # the forward after step t feeds token t of rows still going
        live = [i for i in range(len(ids)) if lengths[i] > t + 1]
        rows += len(live)
        distinct += len({(i // n, tuple(ids[i][:t + 1])) for i in live})
    assert r.stats["gen_forward_rows"] == distinct
    if temperature == 0:
        assert all(ids[i] == ids[i - i % n] for i in range(len(ids)))
        assert distinct * n == rows
    assert distinct < rows


def test_bad_prompts_are_refused(lm, etok):
    engine = TorchEngine(lm, etok)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], SamplingParams())


def test_shared_prompt_logps_and_gradients_equal_separate_rows(lm, etok):
    from tether.online import completion_logps

    r = TorchEngine(lm, etok, seed=5).generate(prompts(etok, 3), SamplingParams(max_new_tokens=10, n=3))
    out = {}
    for share in (False, True):
        lm.zero_grad()
        lp, ent = completion_logps(lm, r.prompt_ids, r.completion_ids, r.mask, 0.9, pad=etok.pad_token_id,
                                   share_prompts=share)
        (lp.sum() * 0.1).backward()
        out[share] = (lp.detach(), ent, lm.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][2], out[False][2], atol=1e-5, rtol=1e-4)
    assert out[True][2].abs().sum() > 0
    lm.zero_grad()


@pytest.mark.parametrize("attention", ["lean", "sdpa", "eager"])  # tether's tree forward; the model's 4-D masks
def test_shared_completion_prefixes_are_computed_once_and_change_nothing(lm, etok, attention, monkeypatch):
    """Rows with one prompt share the states of every completion prefix they have in common (a prefix
    tree): identical completions, branches at different depths, a one-token row, an empty row and a
    lone prompt give the separate rows' log-probs, entropies, hidden states and gradients, by tether's
    lean tree forward and by the model's own forward under a boolean or additive 4-D mask (the fallback
    of architectures the lean one does not cover)."""
    from tether import online
    from tether.online import completion_hidden, completion_logps, completion_states

    lean = attention == "lean"
    if lean:  # the lean forward must have run, not fallen back to the model's
        calls, lean_forward = [], online.tree_states
        monkeypatch.setattr(online, "tree_states", lambda *a: calls.append(1) or lean_forward(*a))

    p = prompts(etok, 4)
    rows = [(0, [5, 6, 7, 8, 0]), (0, [5, 6, 7, 8, 0]), (0, [5, 6, 7, 8, 0]),  # identical
            (1, [9, 10, 11, 12, 13, 0]), (1, [9, 10, 11, 0]), (1, [9, 10, 14, 15, 16, 17, 0]),  # branch at 2 and 3
            (2, [20, 21, 0]), (2, [0]),  # a one-token row
            (3, [30, 31, 32, 0]),  # alone
            (1, [])]  # an empty row (its mask is all 0)
    L = max(len(c) for _, c in rows)
    comp = torch.tensor([c + [etok.pad_token_id] * (L - len(c)) for _, c in rows])
    mask = torch.tensor([[1] * len(c) + [0] * (L - len(c)) for _, c in rows])
    pr = [p[g] for g, _ in rows]
    lens = mask.sum(-1)
    # distinct states: each prompt's last token, then each distinct prefix fed (all but a row's last
    # token). Group 0: 1 + 4; group 1: 1 + [9] [9 10] [9 10 11] [.. 12] [.. 13] + [9 10 14] [.. 15] [.. 16]
    # [.. 17]; group 2: 1 + [20] [20 21]; group 3: 1 + 3
    expected = (1 + 4) + (1 + 5 + 4) + (1 + 2) + (1 + 3)
    lm.set_attn_implementation("sdpa" if attention == "lean" else attention)
    assert len(completion_states(lm, pr, comp, mask, pad=etok.pad_token_id, lean=lean).hidden) == expected
    assert expected < int(lens.sum())
    out = {}
    for share in (False, True):
        lm.zero_grad()
        lp, ent, h = completion_logps(lm, pr, comp, mask, 0.8, pad=etok.pad_token_id, share_prompts=share,
                                      with_hidden=True, lean=lean)
        (lp * torch.linspace(0.1, 1, L)).sum().backward()  # every position its own weight
        hid = completion_hidden(lm, pr, comp, mask, pad=etok.pad_token_id, share_prompts=share, lean=lean)
        out[share] = (lp.detach(), ent, h.detach(), hid.detach(), lm.model.layers[0].mlp.up_proj.weight.grad.clone())
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert (out[True][0][mask.bool()] < 0).all() and (out[True][0][~mask.bool()] == 0).all()
    assert out[True][4].abs().sum() > 0
    assert not lean or calls
    lm.zero_grad()
    lm.set_attn_implementation("sdpa")


def test_completions_that_share_little_split_over_packed_rows(lm, etok, monkeypatch):
    """A completion joins its prompt's packed tree row while that costs less than a row of its own,
    counting a token as ``cost`` attention scores and a row of width S as S·(cost + S): completions that
    share nothing fill several rows (in lexicographic order, each adding what it does not share with the
    one before), completions that share their first tokens fill one. The split changes nothing else."""
    from tether import online

    comp = torch.tensor([[9, 8, 7, 6, 5], [1, 2, 3, 4, 5], [4, 4, 4, 4, 4], [1, 2, 3, 9, 9], [7, 1, 1, 1, 1]])
    lengths, one = torch.tensor([5, 5, 5, 5, 5]), torch.zeros(5, dtype=torch.long)
    # cost 12, prompt 3: alone 7 · 19 = 133. [1 2 3 4] opens a row at width 7; [1 2 3 9] shares 3: 8
    # (+27); [4 4 4 4]: 12 (+128); [7 1 1 1] 16 (+160 > 133) opens a second row, 7; [9 8 7 6]: 11 (+120)
    prompt_of, tree = online._tree_rows(one, [3], comp, lengths, 12.0)
    assert prompt_of == [0, 0] and tree.tolist() == [1, 0, 0, 0, 1]
    assert online._tree_rows(one, [3], comp, lengths, 1e6)[1].tolist() == [0] * 5  # attention is free
    assert online._tree_rows(one, [3], comp[1].repeat(5, 1), lengths, 0.0)[1].tolist() == [0] * 5  # all shared
    two = torch.tensor([0, 1, 0, 1, 0])  # two prompts never share a packed row
    prompt_of, tree = online._tree_rows(two, [3, 4], comp, lengths, 1e6)
    assert prompt_of == [0, 1] and tree.tolist() == [0, 1, 0, 1, 0]
    assert 100 < online.tree_token_cost(lm) < 1e4

    g = torch.Generator().manual_seed(0)  # 2 prompts × 4 completions of 30 tokens, 3 sharing 2 first tokens
    comp = torch.randint(5, len(etok) - 1, (8, 30), generator=g)
    comp[1:4, :2] = comp[0, :2]
    mask = torch.ones_like(comp)
    mask[5, 20:] = 0
    pr = [p for p in prompts(etok, 2) for _ in range(4)]
    out = {}
    for cost in (1e6, 0.0):  # 0: each completion costs more in a shared row's attention than alone
        monkeypatch.setattr(online, "tree_token_cost", lambda model: cost)
        lm.zero_grad()
        lp, _ = online.completion_logps(lm, pr, comp, mask, pad=etok.pad_token_id)
        (lp * torch.linspace(0.1, 1, 30)).sum().backward()
        n = len(online.completion_states(lm, pr, comp, mask, pad=etok.pad_token_id).hidden)
        out[cost] = (lp.detach(), lm.model.layers[0].mlp.up_proj.weight.grad.clone(), n)
    torch.testing.assert_close(out[0.0][0], out[1e6][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[0.0][1], out[1e6][1], atol=1e-5, rtol=1e-4)
    assert out[0.0][2] > out[1e6][2]  # more packed rows: their prompts' states computed once each
    lm.zero_grad()


# ---------------------------------------------------------------------------------------------
# the lean decode step (tether.decoding) against transformers' forward
# ---------------------------------------------------------------------------------------------
def _random_lm(kind: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=kind != "llama")
    extra = {"llama": dict(attention_bias=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 32}),
             "qwen3": dict(head_dim=32), "mistral": dict(sliding_window=None), "qwen2": {}}[kind]
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra)).eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "mistral"])
def test_lean_decode_step_equals_the_model_forward(etok, kind):
    from tether.decoding import lean_decoder

    model = _random_lm(kind, len(etok))
    assert lean_decoder(model, "fp32") is not None
    ps = prompts(etok)
    for temperature in (0.0, 1.0):
        sp = SamplingParams(max_new_tokens=10, temperature=temperature, n=2)
        lean = TorchEngine(model, etok, seed=5).generate(ps, sp)
        hf = TorchEngine(model, etok, seed=5, lean=False).generate(ps, sp)
        assert torch.equal(lean.completion_ids, hf.completion_ids)
        torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=1e-5, rtol=1e-5)
    for i in range(len(lean)):  # and both are the full forward's log-probs
        k = int(lean.mask[i].sum())
        want = full_forward_logps(model, lean.prompt_ids[i], lean.completion_ids[i, :k].tolist())
        torch.testing.assert_close(lean.logprobs[i, :k], want, atol=2e-5, rtol=1e-5)
    assert lean.hidden is None  # only when asked
    from tether.online import completion_hidden

    sp = SamplingParams(max_new_tokens=10, n=2, return_hidden=True)
    for lean_step in (True, False):  # the states each token was sampled from are the trainer's (a value head's input)
        r = TorchEngine(model, etok, seed=5, lean=lean_step).generate(ps, sp)
        want = completion_hidden(model, r.prompt_ids, r.completion_ids, r.mask, pad=etok.pad_token_id)
        torch.testing.assert_close(r.hidden, want, atol=2e-5, rtol=1e-4)
        assert r.hidden.shape == (len(r), r.mask.shape[1], model.config.hidden_size) and r.hidden.abs().sum() > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_packed_decode_weights_give_the_plain_products(etok, dtype):
    """The decode step's weights packed once for oneDNN (decoding._packed) give the plain products
    (fp32 up to summation order; bf16 bit for bit on the hosts measured, asserted up to its rounding),
    and they are packed."""
    from tether.decoding import LeanDecoder

    model = _random_lm("qwen2", len(etok))
    packed, plain = LeanDecoder(model, dtype), LeanDecoder(model, dtype, pack=False)
    assert len(packed.head) == 3 and all(len(w[k]) == 3 for w in packed.layers for k in ("qkv", "o", "gate_up", "down"))
    assert len(plain.head) == 2
    ps = prompts(etok)
    runs = []
    for dec in (packed, plain):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("tether.rollout.lean_decoder", lambda *a, **k: dec)
            runs.append(TorchEngine(model, etok, dtype).generate(ps, SamplingParams(max_new_tokens=8, temperature=0)))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    tol = 1e-5 if dtype == "fp32" else 1e-2
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind,padding", [("qwen2", 0.0), ("qwen2", 1.0), ("llama", 0.0), ("qwen3", 1.0),
                                          ("mistral", 0.0)])
def test_lean_tree_forward_equals_the_model_forward(etok, kind, padding, monkeypatch):
    """tether's packed prefix-tree forward (tether.decoding.tree_states: fused projections, stacked
    grouped-query heads, the real tokens moved out of the padded rows or the padding computed with
    them) gives the log-probs and gradients of one plain row per completion through the model's own
    forward: equal in float32, within bf16 rounding under bf16."""
    from tether import decoding
    from tether.decoding import tree_states
    from tether.online import completion_logps

    monkeypatch.setattr(decoding, "PADDING_COMPUTED", padding)  # 0: real tokens only; 1: the padded rows
    model = _random_lm(kind, len(etok)).train()
    ps = prompts(etok, 3)
    r = TorchEngine(model, etok, seed=3).generate(ps, SamplingParams(max_new_tokens=12, n=4))
    mask = (torch.arange(12)[None] < torch.tensor([12, 3, 7, 1, 12, 9, 5, 12, 2, 11, 12, 6])[:, None]).long()
    comp = r.completion_ids.masked_fill(mask == 0, etok.pad_token_id)  # rows of several lengths: packed rows
    ids, pos = torch.tensor([[3, 4, 5, 0]]), torch.tensor([[0, 1, 2, 0]])
    allowed = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]]).bool()
    assert tree_states(model, ids, pos, allowed, ids != 0, "fp32").shape == (3, model.config.hidden_size)
    for dtype, tol in (("fp32", 2e-5), ("bf16", 0.1)):
        out = {}
        for share in (False, True):
            model.zero_grad()
            lp, _ = completion_logps(model, r.prompt_ids, comp, mask, 0.9, dtype, etok.pad_token_id,
                                     share_prompts=share, lean=True)
            (lp * torch.linspace(0.1, 1, lp.shape[1])).sum().backward()
            grads = [model.model.layers[0].self_attn.k_proj.weight.grad, model.model.layers[-1].mlp.down_proj.weight.grad]
            out[share] = (lp.detach(), [g.clone() for g in grads])
        torch.testing.assert_close(out[True][0], out[False][0], atol=tol, rtol=tol)
        for a, b in zip(out[True][1], out[False][1]):
            assert a.abs().sum() > 0
            assert (a - b).norm() <= (1e-4 if dtype == "fp32" else 0.05) * b.norm()
    model.zero_grad()


def test_lean_decode_in_bf16_stays_near_the_float32_forward(lm, etok):
    ps = prompts(etok)
    r = TorchEngine(lm, etok, dtype="bf16", seed=2).generate(ps, SamplingParams(max_new_tokens=12, n=2))
    for i in range(len(r)):
        k = int(r.mask[i].sum())
        want = full_forward_logps(lm, r.prompt_ids[i], r.completion_ids[i, :k].tolist())
        assert (r.logprobs[i, :k] - want).abs().max() < 0.1  # bf16 weights: ~3 significant digits


def test_lean_decode_attends_in_float32_to_keys_rounded_as_the_trainers(lm, etok, monkeypatch):
    """In bf16 the decode step's cache holds float32 keys and values rounded to bf16: the inputs the
    trainer's attention computes with (SDPA's math kernel, ``decoding.tree_states``), so that scores,
    softmax and the weighted sum run in float32 as there, not as bf16 products of the cache."""
    from tether import decoding

    seen = []
    step = decoding.LeanDecoder.__call__

    def spy(self, tok, pos, cache, key_mask):
        out = step(self, tok, pos, cache, key_mask)
        seen.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        return out

    monkeypatch.setattr(decoding.LeanDecoder, "__call__", spy)
    TorchEngine(lm, etok, dtype="bf16", seed=0).generate(prompts(etok), SamplingParams(max_new_tokens=6, n=2))
    assert seen
    for k, v in seen[-1]:
        assert k.dtype == v.dtype == torch.float32
        assert torch.equal(k, k.to(torch.bfloat16).float()) and torch.equal(v, v.to(torch.bfloat16).float())


def test_the_engine_samples_weights_updated_in_place_by_the_fused_optimizer(etok):
    """The lean step snapshots the weights at each generation: an in-place update that bumps no
    version counter (fused AdamW) must still reach the samples."""
    model = _random_lm("qwen2", len(etok))
    engine, ps = TorchEngine(model, etok), prompts(etok, 2)
    before = engine.generate(ps, SamplingParams(max_new_tokens=6, temperature=0))
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    after = engine.generate(ps, SamplingParams(max_new_tokens=6, temperature=0))
    for i in range(len(after)):
        k = int(after.mask[i].sum())
        want = full_forward_logps(model, after.prompt_ids[i], after.completion_ids[i, :k].tolist())
        torch.testing.assert_close(after.logprobs[i, :k], want, atol=2e-5, rtol=1e-5)
    assert not torch.equal(before.logprobs, after.logprobs)


def test_cache_is_handed_over_without_deprecation_warnings(lm, etok):
    """The engine and the shared-prefix forward pass their KV cache under the keyword this
    transformers takes (``cache`` since 5.24, where ``past_key_values`` warns and 5.40 drops it)."""
    import warnings

    from tether.online import completion_logps

    ps = prompts(etok, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = TorchEngine(lm, etok, seed=0, lean=False).generate(ps, SamplingParams(max_new_tokens=6, n=2))
        completion_logps(lm, r.prompt_ids, r.completion_ids, r.mask, pad=etok.pad_token_id)
    assert len(r.texts) == 4
    assert not [w for w in caught if "past_key_values" in str(w.message)]
