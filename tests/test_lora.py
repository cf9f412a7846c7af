"""LoRA (``lora_rank > 0``, :mod:`tether.lora`): only the adapters train, the reference is the model
with its adapters off, the fused paths apply the adapters, checkpoints hold the adapter and resume
exactly, and ``final/`` is the merged model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tether import dpo, grpo, lora, ppo, sft
from tether.config import ConfigError
from tether.decoding import lean_decoder, tree_states
from tether.modeling import load_causal_lm
from tether.online import completion_logps
from tether.rollout import SamplingParams, TorchEngine


class Cfg(lora.LoraFields):
    disable_dropout: bool = True


def adapted(path, rank=4, **kw):
    """A model with adapters whose B is random (B = 0 at injection would hide a missing update)."""
    model = lora.apply(load_causal_lm(path), Cfg(lora_rank=rank, **kw))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_only_adapters_train_and_start_from_the_model(tiny_model):
    base = load_causal_lm(tiny_model)
    model = lora.apply(load_causal_lm(tiny_model), Cfg(lora_rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert type(model) is type(base) and lora.has_adapters(model) and not lora.has_adapters(base)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():  # B = 0: the adapted model is the model
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_reference_is_the_model_with_adapters_off(tiny_model):
    base, model = load_causal_lm(tiny_model), adapted(tiny_model)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        on = model(ids).logits
        assert (on - base(ids).logits).abs().max() > 1e-2  # the adapters change the function
        with lora.as_reference(model) as ref:
            assert torch.allclose(ref(ids).logits, base(ids).logits, atol=1e-6)
        assert torch.equal(model(ids).logits, on)  # back on afterwards
    model.train()
    with lora.as_reference(model):
        assert not model.training
    assert model.training


def test_fused_paths_apply_the_adapters(tiny_model, tokenizer):
    """The lean decode step and the packed-tree training forward read the effective weight W + s·B A:
    the sampler's log-probs equal the model's own forward, adapters on and off."""
    model = adapted(tiny_model).eval()
    assert lean_decoder(model, "fp32") is not None
    prompts = [tokenizer("1+2=", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    roll = TorchEngine(model, tokenizer, "fp32", seed=0).generate(prompts, SamplingParams(6, 1.0, n=3))
    rows = [p for p in prompts for _ in range(3)]
    for lean in (True, False):
        with torch.no_grad():
            lp = completion_logps(model, rows, roll.completion_ids, roll.mask, 1.0, "fp32", 0, lean=lean)[0]
        assert torch.allclose(lp, roll.logprobs, atol=1e-4), (lean, (lp - roll.logprobs).abs().max())
    # and the reference through the fused forward is the base model's
    base = load_causal_lm(tiny_model)
    with torch.no_grad(), lora.as_reference(model):
        ref = completion_logps(model, rows, roll.completion_ids, roll.mask, 1.0, "fp32", 0, lean=True)[0]
    plain = completion_logps(base, rows, roll.completion_ids, roll.mask, 1.0, "fp32", 0, lean=True)[0]
    assert torch.allclose(ref, plain, atol=1e-5)
    assert (ref - lp).abs().max() > 1e-3


def test_training_forward_gradient_reaches_only_the_adapters(tiny_model):
    model = adapted(tiny_model).train()
    ids = torch.randint(3, 200, (1, 7))
    real = torch.ones(1, 7, dtype=torch.bool)
    allowed = torch.ones(1, 7, 7, dtype=torch.bool).tril()
    h = tree_states(model, ids, torch.arange(7)[None], allowed, real, "fp32")
    assert h is not None
    h.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert any(".lora_A." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_not_mergeable_adapters_take_the_models_forward(tiny_model):
    model = adapted(tiny_model, lora_dropout=0.1, disable_dropout=False).train()
    assert not lora.mergeable(model) and lean_decoder(model, "fp32") is None
    assert lora.mergeable(model.eval())  # dropout is off in eval mode


def test_lora_dropout_needs_dropout_on():
    with pytest.raises(ValueError, match="disable_dropout"):
        Cfg(lora_rank=4, lora_dropout=0.1)


def test_bad_target_modules_are_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="lora_target_modules"):
        lora.apply(load_causal_lm(tiny_model), Cfg(lora_rank=4, lora_target_modules=["no_such_proj"]))


def straight_and_resumed(module, config, tmp_path, stop: int, **common):
    """A run straight through, and the same run stopped after ``stop`` steps and resumed: their results
    and final weights, which must be equal (resume is exact)."""
    straight = module.train(config(output_dir=str(tmp_path / "a"), **common))
    module.train(config(output_dir=str(tmp_path / "b"), stop_at_step=stop, **common))
    resumed = module.train(config(output_dir=str(tmp_path / "b"), resume=True, **common))
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight, resumed, a


def test_sft_lora_checkpoints_resume_and_final(tiny_model, tmp_path):
    straight, _, a = straight_and_resumed(
        sft, sft.SFTConfig, tmp_path, 3, model=str(tiny_model), lora_rank=4, lr=1e-2, max_steps=6, batch_size=8,
        micro_batch_size=8, arith_rows=64, eval_data="none", progress=False, report=False, dtype="fp32")
    ckpt = sorted((tmp_path / "b" / "checkpoints").iterdir())[-1]
    assert (ckpt / lora.ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()  # adapter only
    assert not any("lora" in k or "base_layer" in k for k in a)  # final/ is a plain model
    base = load_causal_lm(tiny_model).state_dict()
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted matrices moved
    # the adapter folder and the checkpoint load as the same merged model
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        final = load_causal_lm(straight.final_dir)(ids).logits
        from_adapter = load_causal_lm(straight.final_dir / "adapter")(ids).logits
        from_ckpt = load_causal_lm(sorted((tmp_path / "a" / "checkpoints").iterdir())[-1])(ids).logits
    assert torch.allclose(final, from_adapter, atol=1e-5) and torch.allclose(final, from_ckpt, atol=1e-5)
    config = json.loads((straight.final_dir / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"


def test_grpo_lora_reference_without_a_second_model(sft_model, tmp_path):
    # the SFT model: mixed rewards within groups, so the policy moves
    cfg = grpo.GRPOConfig(model=str(sft_model), output_dir=str(tmp_path / "g"), lora_rank=4, beta=0.1, max_steps=3,
                          prompts_per_step=8, num_generations=4, max_new_tokens=16, mini_batches=1, eval_data="none",
                          progress=False, report=False, lr=1e-2, ema_decay=0.0, dtype="fp32")
    from tether.online import Session

    s = Session(cfg, "grpo")
    assert s.ref is s.policy  # no second copy
    r = grpo.train(cfg.model_copy(update={"overwrite": True}))
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert recs[-1]["kl"] > 1e-4  # then it moves away from it
    assert all(m["logp_gap"] < 1e-5 for m in recs)  # the sampler samples the adapted policy


def test_ppo_and_dpo_run_with_lora(tiny_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "p"), lora_rank=4, max_steps=2,
                                prompts_per_step=2, num_generations=4, max_new_tokens=6, eval_data="none",
                                progress=False, report=False, dtype="fp32"))
    assert (r.final_dir / "adapter" / lora.ADAPTER_WEIGHTS).is_file()
    d = dpo.train(dpo.DPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "d"), lora_rank=4, max_steps=2,
                                batch_size=4, micro_batch_size=4, arith_pairs=16, eval_data="none", progress=False,
                                report=False, dtype="fp32"))
    first = json.loads((d.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # π = π_ref at the start: log 2


def test_plain_parameters_are_the_merged_models(tiny_model):
    """What a vLLM engine loads at each sync: the merged model's parameters by their plain names."""
    model = adapted(tiny_model)
    plain = dict(lora.plain_parameters(model))
    merged = dict(lora.merged_copy(model).named_parameters())
    assert plain.keys() == merged.keys()
    assert all(torch.allclose(plain[k], merged[k], atol=1e-6) for k in plain)
    assert not torch.allclose(plain["model.layers.0.mlp.up_proj.weight"],
                              dict(load_causal_lm(tiny_model).named_parameters())["model.layers.0.mlp.up_proj.weight"])


def test_reward_model_lora_trains_its_head_whole_and_resumes(tiny_model, tmp_path):
    from tether import reward

    common = dict(model=str(tiny_model), lora_rank=4, lr=1e-2, max_steps=4, batch_size=4, micro_batch_size=4,
                  arith_pairs=32, eval_data="none", progress=False, report=False, dtype="fp32")
    straight, _, a = straight_and_resumed(reward, reward.RewardConfig, tmp_path, 2, **common)
    assert not any("lora" in k or "modules_to_save" in k or "original_module" in k for k in a)  # a plain model
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        final = reward.load_reward_model(straight.final_dir)
        from_adapter = reward.load_reward_model(straight.final_dir / "adapter")
        assert torch.allclose(final(ids).logits, from_adapter(ids).logits, atol=1e-5)
    # the new head trains whole (peft's modules_to_save), the backbone through its adapters only
    from tether import runs

    model = runs.load_trainable(reward.RewardConfig(**common), None, tiny_model, reward.load_reward_model, ("score",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable
    assert all(".lora_" in n or n.startswith("score.modules_to_save") for n in trainable)


def test_weight_average_keeps_only_the_adapters(tiny_model):
    """ema_decay with LoRA averages the adapters alone (no copy of the frozen base), swapped into the
    model where it is used and swapped back after."""
    from tether.online import WeightAverage

    model = adapted(tiny_model)
    average = WeightAverage(model, 0.5)
    assert average.names and all(".lora_" in n for n in average.names)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    average.update(model)  # (W_0 + θ_1) / 2
    with average.applied(model):
        assert all(torch.allclose(p, start[n] + 0.5 * p.requires_grad) for n, p in model.named_parameters())
    assert all(torch.allclose(p, start[n] + 1.0 * p.requires_grad) for n, p in model.named_parameters())


def test_gpt2_conv1d_layers_merge(gpt2_model):
    """GPT-2's projections are Conv1D (weights stored in × out): the merged model (final/, vLLM's
    weights) is the adapted model."""
    model = adapted(gpt2_model).eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        merged = lora.merged_copy(model)
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-5)
        with lora.as_reference(model):
            assert (merged(ids).logits - model(ids).logits).abs().max() > 1e-3  # the adapters mattered
    plain = dict(lora.plain_parameters(model))
    assert all(torch.allclose(plain[n], p, atol=1e-6) for n, p in merged.named_parameters())


def test_dpo_lora_reference_scored_late_is_the_base_model(tiny_model, tmp_path):
    """reference=cached scores each pair when first drawn, after the policy has moved: with LoRA, by the
    policy with its adapters off, so the losses equal precompute's (every pair scored before step 1)."""
    def losses(mode):
        r = dpo.train(dpo.DPOConfig(model=str(tiny_model), output_dir=str(tmp_path / mode), lora_rank=4, lr=1e-2,
                                    max_steps=4, batch_size=4, micro_batch_size=4, arith_pairs=16, reference=mode,
                                    eval_data="none", progress=False, report=False, dtype="fp32"))
        return [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    cached, precomputed = losses("cached"), losses("precompute")
    assert cached == pytest.approx(precomputed, rel=1e-5, abs=1e-7)
    assert cached[-1] != pytest.approx(cached[0])  # the policy did move


def test_ppo_separate_critic_gets_adapters_too(tiny_model, tmp_path):
    r = ppo.train(ppo.PPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "p"), lora_rank=4, critic="separate",
                                max_steps=2, prompts_per_step=2, num_generations=4, max_new_tokens=6, lr=1e-2,
                                eval_data="none", progress=False, report=False, dtype="fp32"))
    critic = torch.load(r.final_dir / "critic.pt", weights_only=True)
    start = load_causal_lm(tiny_model).state_dict()
    base = {k.removeprefix("lm."): v for k, v in critic.items() if k.startswith("lm.") and ".lora_" not in k}
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in critic.items())  # the adapters trained
    for k, v in base.items():  # the backbone did not
        assert torch.equal(v, start[k.replace(".base_layer", "")]), k
    assert critic["head.v.weight"].abs().sum() > 0  # nor did the head stay at zero
