"""Local checkpoints of architectures that differ from the embedded Qwen2 where tether's packed paths
could silently differ from the model's own forward:

- logits post-processed after the LM head (Gemma 2's soft-capping, Granite's logit scaling on top of
  its embedding/residual/attention multipliers, Cohere's logit scale): every path that runs the
  backbone and the head apart must give the model's own logits;
- sliding-window attention (Mistral: every layer; Gemma 2: every other one): tether's 4-D masks
  (packed prefix trees, pair rows) reach the layers as they are, so sequences longer than the window
  must run under the model's own masks;
- ALiBi (BLOOM, MPT): the position bias comes from a 2-D mask, so no 4-D mask can be used at all
  (BLOOM's forward raised on one, MPT's computed other log-probs);
- SFT packing by restarting position ids, which BLOOM, MPT, OPT and XGLM ignore (their attention
  crosses the packed examples): refused there."""

import json

import pytest
import torch

from tether import grpo
from tether.config import ConfigError
from tether.modeling import _head_kind, head_logits, load_causal_lm


def _build(kind: str, vocab: int, pad: int, eos: int):
    from transformers import (BloomConfig, BloomForCausalLM, CohereConfig, CohereForCausalLM, Gemma2Config,
                              Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, MistralConfig, MistralForCausalLM,
                              MptConfig, MptForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eos, pad_token_id=pad,
                  bos_token_id=None)
    torch.manual_seed(0)
    model = {
        "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0)),
        "granite": lambda: GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0, embedding_multiplier=3.0,
                                                            residual_multiplier=0.5, attention_multiplier=0.1)),
        "cohere": lambda: CohereForCausalLM(CohereConfig(**common, logit_scale=0.25)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common)),
        # windows of 6 positions: the arithmetic world's prompts alone are longer
        "gemma2-window": lambda: Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, sliding_window=6)),
        "mistral-window": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=6)),
        "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4,
                                                      eos_token_id=eos, pad_token_id=pad, bos_token_id=None)),
        "mpt": lambda: MptForCausalLM(MptConfig(vocab_size=vocab, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                                                max_seq_len=128, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)),
    }[kind]()
    if kind not in ("bloom", "mpt"):
        with torch.no_grad():  # logits of several units, where soft-capping and scaling change them a lot
            for p in model.parameters():
                p.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    out = {}
    for kind in ("gemma2", "granite", "cohere", "gemma2-window", "mistral-window", "bloom", "mpt"):
        path = tmp_path_factory.mktemp(kind) / "model"
        _build(kind, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind,head", [("gemma2", "model"), ("granite", "model"), ("cohere", "model"),
                                       ("qwen2", "plain")])
def test_head_logits_are_the_models_own(kind, head):
    model = _build(kind, 96, 1, 0).eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids).logits
    hidden = model.base_model(input_ids=ids).last_hidden_state
    assert _head_kind(model) == head
    got = head_logits(model, hidden.reshape(-1, hidden.shape[-1]))
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    if head == "model":  # the bare output embedding would be wrong by a lot
        assert (model.get_output_embeddings()(hidden) - want).abs().max() > 0.1
    got.sum().backward()  # and the head still trains
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_a_head_tether_cannot_reproduce_is_refused():
    model = _build("qwen2", 96, 1, 0).eval()
    forward = model.forward

    def odd(input_ids=None, **kw):  # logits that depend on more than the final hidden states
        out = forward(input_ids=input_ids, **kw)
        out.logits = out.logits + input_ids[..., None].float()
        return out

    model.forward = odd
    with pytest.raises(ConfigError, match="not supported"):
        _head_kind(model)


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere", "gemma2-window", "mistral-window", "bloom", "mpt"])
def test_trainer_and_sampler_agree(checkpoints, tmp_path, kind):
    """One fp32 GRPO update per rollout: the trainer's log-probs are the sampler's (they were 0.4 to
    7 nats a token apart with the bare output embedding, 0.5 and 0.8 with the windows ignored, 0.4 for
    MPT under a 4-D mask; BLOOM raised)."""
    r = grpo.train(grpo.GRPOConfig(model=str(checkpoints[kind]), output_dir=str(tmp_path / "run"), max_steps=1,
                                   prompts_per_step=2, num_generations=4, max_new_tokens=6, eval_data="none",
                                   progress=False, report=False, dtype="fp32", mini_batches=1, beta=0.04))
    rec = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]
    assert rec["logp_gap"] < 1e-4 and rec["kl"] < 1e-6, rec


def test_sliding_windows_are_found():
    from tether.modeling import custom_masks_exact, sliding_window

    assert sliding_window(_build("qwen2", 96, 1, 0)) is None  # Qwen2 has a window size but does not use it
    assert sliding_window(_build("mistral-window", 96, 1, 0)) == 6
    gemma = _build("gemma2-window", 96, 1, 0)
    assert sliding_window(gemma) == 6 and custom_masks_exact(gemma, 6) and not custom_masks_exact(gemma, 7)


def test_models_that_ignore_4d_masks_are_found():
    from tether.modeling import _masks_honoured

    assert _masks_honoured(_build("qwen2", 96, 1, 0)) and _masks_honoured(_build("gemma2", 96, 1, 0))
    assert not _masks_honoured(_build("bloom", 96, 1, 0)) and not _masks_honoured(_build("mpt", 96, 1, 0))


@pytest.mark.parametrize("kind", ["gemma2", "gemma2-window", "mistral-window", "bloom", "mpt"])
def test_dpo_log_probs_are_the_models_own(checkpoints, tokenizer, kind):
    """DPO's pair log-probs (shared-prompt rows, the head once per position) equal the sum of the
    model's own token log-probs of each completion."""
    from tether.arith import ArithSpec, preference_rows
    from tether.data import read_rows, tokenize_pairs
    from tether.dpo import pair_logps

    model = load_causal_lm(checkpoints[kind]).eval()
    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 3, 0)), tokenizer, 128)
    chosen, rejected, _, _ = pair_logps(model, pairs, tokenizer.pad_token_id, None)
    for i, pair in enumerate(pairs):
        for got, completion in ((chosen[i], pair.chosen), (rejected[i], pair.rejected)):
            ids = torch.tensor([pair.prompt + completion])
            logp = model(input_ids=ids).logits[0, len(pair.prompt) - 1:-1].log_softmax(-1)
            want = logp.gather(-1, torch.tensor(completion)[:, None]).sum()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# Tiny random checkpoints of the causal-LM families people fine-tune, by model type: the sizes each
# config names its own way, and the settings that exercise a path (windows, alibi, MoE routing).
FAMILIES = {
    "llama": {}, "mistral": dict(sliding_window=6), "qwen2": {}, "qwen3": dict(head_dim=16),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=2, num_experts_per_tok=1), "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, final_logit_softcapping=2.0), "gemma3_text": dict(head_dim=16),
    "phi": {}, "phi3": {}, "gpt2": dict(n_embd=64, n_layer=2, n_head=4), "gptj": dict(n_embd=64, n_layer=2, n_head=4,
                                                                                     rotary_dim=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=256), "gpt_neox": {},
    "codegen": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8), "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "xglm": dict(d_model=64, ffn_dim=128, attention_heads=4), "bloom": dict(n_layer=2, n_head=4),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2), "falcon": dict(new_decoder_architecture=False),
    "falcon-alibi": dict(new_decoder_architecture=False, alibi=True), "stablelm": dict(num_key_value_heads=4),
    "olmo": {}, "olmo2": {}, "starcoder2": {}, "granite": dict(logits_scaling=4.0, embedding_multiplier=3.0,
                                                               residual_multiplier=0.5, attention_multiplier=0.1),
    "granitemoe": dict(num_local_experts=2, num_experts_per_tok=1), "cohere": dict(logit_scale=0.25),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_samples_and_trains_the_same_log_probs(family, tokenizer):
    """The rollout engine's log-probs (the model's own forward, or tether's fused decode) against the
    trainer's (packed prefix trees, tether's fused tree forward, or plain rows, whichever applies)
    on 2 prompts × 4 sampled completions, DPO's shared-prompt pair rows against plain rows, and SFT's
    packed rows against one row per example where the model keeps packed examples apart, fp32: one
    function of the weights, to float noise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tether.online import completion_logps
    from tether.rollout import SamplingParams, TorchEngine

    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    try:
        cfg = AutoConfig.for_model(family.split("-")[0], **{**kw, **FAMILIES[family]})
    except (KeyError, ValueError) as e:  # a family this transformers version no longer has
        pytest.skip(f"{family}: {e}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in ("Question: What is 3 + 4?\nAnswer:", "Question: What is 12 * 11?\nAnswer:")]
    roll = TorchEngine(model, tokenizer, seed=1).generate(prompts, SamplingParams(max_new_tokens=8, n=4))
    for lean in (True, False):
        lp, _ = completion_logps(model, roll.prompt_ids, roll.completion_ids, roll.mask, pad=tokenizer.pad_token_id,
                                 lean=lean)
        torch.testing.assert_close(lp, roll.logprobs, rtol=0, atol=1e-4)
    # DPO's shared-prompt pair rows against TRL's layout (a plain row per completion)
    from tether.arith import ArithSpec, preference_rows
    from tether.data import read_rows, tokenize_pairs
    from tether.dpo import pair_logps

    pairs, _ = tokenize_pairs(read_rows(preference_rows(ArithSpec(), 3, 0)), tokenizer, 128)
    shared = pair_logps(model, pairs, tokenizer.pad_token_id, None, shared_prompt=True)[:2]
    plain = pair_logps(model, pairs, tokenizer.pad_token_id, None, shared_prompt=False)[:2]
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-4)
    # SFT's packing (position ids restarting per example) where the model keeps packed examples apart
    from tether.data import collate, pack, tokenize_sft
    from tether.modeling import packing_honoured, target_logits

    if packing_honoured(model):
        examples, _ = tokenize_sft(read_rows([{"prompt": f"What is {a} + {a}?", "completion": f" {2 * a}"}
                                              for a in (3, 41, 7)]), tokenizer, 64)
        packed, _ = target_logits(model, collate(pack(examples, 64), tokenizer.pad_token_id))
        alone = torch.cat([target_logits(model, collate([e], tokenizer.pad_token_id))[0] for e in examples])
        torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_packing_is_refused_where_position_ids_do_not_separate_examples(checkpoints, tmp_path):
    """BLOOM's attention would cross packed examples (its logits moved by 0.6 when packed): SFT refuses
    ``packing=true`` on it before training instead of learning from the mix."""
    from tether import sft

    with pytest.raises(ConfigError, match="packing=true"):
        sft.train(sft.SFTConfig(model=str(checkpoints["bloom"]), output_dir=str(tmp_path / "sft"), packing=True,
                                max_steps=1, batch_size=4, micro_batch_size=4, arith_rows=16, eval_data="none",
                                progress=False, report=False))
