"""The vLLM engine (tether.vllm_engine) against a stand-in for vLLM's ``LLM``: the same calls and output
types (RequestOutput.outputs[j].token_ids / .logprobs / .finish_reason, collective_rpc on a worker whose
model_runner.model takes transformers-named weights), sampling done by tether's engine on the stand-in's
own copy of the weights. A real vLLM needs a GPU and its own CUDA build of torch: the test at the end runs
only where vLLM imports and CUDA is present."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from tether import grpo, vllm_engine
from tether.modeling import load_causal_lm, load_tokenizer
from tether.rollout import SamplingParams, TorchEngine


class StandInModel:
    """vLLM's model as ``load_weights`` sees it: (transformers name, tensor) pairs copied in."""

    def __init__(self, lm):
        self.lm = lm

    def load_weights(self, weights):
        params = dict(self.lm.named_parameters())
        for name, w in weights:
            params[name].data.copy_(w)


class StandInLLM:
    def __init__(self, lm, tokenizer):
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=StandInModel(copy.deepcopy(lm))))
        self.tokenizer, self.seeds, self.resets = tokenizer, [], 0

    def generate(self, prompts, sampling, use_tqdm=True):
        assert len(prompts) == len(sampling) and not use_tqdm
        outs = []
        for p, sp in zip(prompts, sampling):
            assert sp.logprobs == 0 and sp.include_stop_str_in_output
            self.seeds.append(sp.seed)
            params = SamplingParams(sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.n, tuple(sp.stop or ()),
                                    min_p=sp.min_p)
            r = TorchEngine(self.worker.model_runner.model.lm, self.tokenizer, seed=sp.seed).generate(
                [p["prompt_token_ids"]], params)
            completions = []
            for ids, lp, m, trunc in zip(r.completion_ids, r.logprobs, r.mask, r.truncated):
                k = int(m.sum())
                completions.append(SimpleNamespace(
                    token_ids=ids[:k].tolist(), finish_reason="length" if trunc else "stop",
                    logprobs=[{int(t): SimpleNamespace(logprob=float(v))} for t, v in zip(ids[:k], lp[:k])]))
            outs.append(SimpleNamespace(outputs=completions))
        return outs

    def collective_rpc(self, method, args=()):
        return [method(self.worker, *args)]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def stand_in(monkeypatch):
    """vllm_engine's two vLLM entry points replaced: its LLM and its SamplingParams."""
    made = []

    def make_llm(model_path, dtype, seed, gpu_memory_utilization, max_model_len):
        llm = StandInLLM(load_causal_lm(model_path), load_tokenizer(model_path))
        made.append(llm)
        return llm

    monkeypatch.setattr(vllm_engine, "_make_llm", make_llm)
    monkeypatch.setattr(vllm_engine, "_vllm_sampling", lambda **kw: SimpleNamespace(**kw))
    return made


def test_outputs_become_a_rollout(tokenizer):
    """Right-padded ids, the mask up to and including the last token, each token's log-prob, length
    as truncated; a completion without log-probs or the wrong count is refused."""
    def out(*completions):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason=f,
                                                        logprobs=[{t: SimpleNamespace(logprob=-0.5 * (i + 1))}
                                                                  for i, t in enumerate(ids)])
                                        for ids, f in completions])

    eos = tokenizer.eos_token_id
    outputs = [out(([5, 6, eos], "stop"), ([7], "stop")), out(([8, 9, 10, 11], "length"), ([12, eos], "stop"))]
    r = vllm_engine.rollout_from_outputs(outputs, [[1, 2], [3]], 2, tokenizer, pad=99)
    assert r.prompt_ids == [[1, 2], [1, 2], [3], [3]]
    assert r.completion_ids.tolist() == [[5, 6, eos, 99], [7, 99, 99, 99], [8, 9, 10, 11], [12, eos, 99, 99]]
    assert r.mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert r.logprobs[2].tolist() == [-0.5, -1.0, -1.5, -2.0] and r.logprobs[1, 1:].abs().sum() == 0
    assert r.truncated.tolist() == [False, False, True, False]
    assert r.texts[1] == tokenizer.decode([7], skip_special_tokens=True)
    with pytest.raises(ValueError, match="expected 3"):
        vllm_engine.rollout_from_outputs(outputs, [[1, 2], [3]], 3, tokenizer, pad=99)
    outputs[0].outputs[0].logprobs = None
    with pytest.raises(ValueError, match="no log-prob"):
        vllm_engine.rollout_from_outputs(outputs, [[1, 2], [3]], 2, tokenizer, pad=99)


def test_seeds_follow_the_run_and_resume(tiny_model, tokenizer, stand_in):
    """One seed per request, from the run's seed and the number of generate calls before: a resumed
    engine (its state loaded) draws the seeds the first one drew next, and the same rollout."""
    params = SamplingParams(max_new_tokens=5, n=3)
    prompts = [[5, 6, 7], [8, 9]]
    a = vllm_engine.VLLMEngine(str(tiny_model), tokenizer, seed=3)
    a.generate(prompts, params)
    a.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))  # greedy (evaluation): not counted
    state = a.state_dict()
    assert state == {"calls": 1}
    second = a.generate(prompts, params)
    b = vllm_engine.VLLMEngine(str(tiny_model), tokenizer, seed=3)
    b.load_state_dict(state)
    again = b.generate(prompts, params)
    seeds_a, seeds_b = stand_in[0].seeds, stand_in[1].seeds
    assert seeds_b == seeds_a[4:6] and len(set(seeds_a[:2] + seeds_a[4:6])) == 4  # distinct per prompt and call
    assert torch.equal(again.completion_ids, second.completion_ids) and torch.equal(again.logprobs, second.logprobs)
    c = vllm_engine.VLLMEngine(str(tiny_model), tokenizer, seed=4)
    c.generate(prompts, params)
    assert stand_in[2].seeds != seeds_a[:2]


def test_sync_weights_loads_the_policy_and_drops_the_prefix_cache(tiny_model, tokenizer, stand_in):
    engine = vllm_engine.VLLMEngine(str(tiny_model), tokenizer)
    policy = load_causal_lm(tiny_model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inside = stand_in[0].worker.model_runner.model.lm
    assert not torch.equal(inside.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    engine.sync_weights(policy)
    for (name, p), (_, q) in zip(policy.named_parameters(), inside.named_parameters()):
        assert torch.equal(p, q), name
    assert stand_in[0].resets == 1


def test_grpo_samples_from_vllm_with_the_policys_weights(tiny_model, tmp_path, stand_in, monkeypatch):
    """engine=vllm in a trainer: every step's rollout comes from the engine, synced after each update,
    so with one update per rollout the trainer's log-probs of what it sampled are those of its own
    weights (fp32: ~1e-7). Without
    the sync the stand-in keeps sampling from the starting weights, and after the first update the gap
    is ~0.4 nats a token (the reward varies with the length, so the weights do move)."""
    from tether import rewards

    monkeypatch.setitem(rewards.REWARDS, "by_length", lambda p, completions, m: [len(c) % 5 for c in completions])
    cfg = grpo.GRPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=3, prompts_per_step=2,
                          num_generations=4, max_new_tokens=6, eval_data="none", progress=False, report=False,
                          lr=1e-2, ema_decay=0.0, engine="vllm", reward="by_length", mini_batches=1,
                          dtype="fp32")
    r = grpo.train(cfg)
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 3 and stand_in[0].resets == 3
    assert len(stand_in[0].seeds) == 3 * 2
    assert all(m["logp_gap"] < 1e-4 for m in recs), [m["logp_gap"] for m in recs]
    # with vLLM the sampler correction is on by default (token_truncate): here its ρ is 1 to float noise
    assert all(m["sampler_gap_max"] < 1e-4 and abs(m["sampler_ratio"] - 1) < 1e-4 for m in recs)
    moved = load_causal_lm(r.final_dir).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(moved, load_causal_lm(tiny_model).model.layers[0].mlp.up_proj.weight)


def test_grpo_with_lora_samples_from_vllm_with_the_merged_policy(tiny_model, tmp_path, stand_in, monkeypatch):
    """lora_rank with engine=vllm: vLLM holds the merged model, loaded from the base and synced with the
    policy's merged weights (lora.plain_parameters) after each update; resuming syncs the checkpoint's."""
    from tether import rewards

    monkeypatch.setitem(rewards.REWARDS, "by_length", lambda p, completions, m: [len(c) % 5 for c in completions])
    cfg = dict(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=4, prompts_per_step=2,
               num_generations=4, max_new_tokens=6, eval_data="none", progress=False, report=False, lr=1e-2,
               ema_decay=0.0, engine="vllm", reward="by_length", mini_batches=1, dtype="fp32", lora_rank=4)
    grpo.train(grpo.GRPOConfig(**cfg, stop_at_step=2))
    r = grpo.train(grpo.GRPOConfig(**cfg, resume=True))
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(recs) == 4 and all(m["logp_gap"] < 1e-4 for m in recs), [m["logp_gap"] for m in recs]


def test_without_vllm_engine_vllm_is_a_clear_error(tiny_model, tmp_path):
    import importlib.util

    from tether.config import ConfigError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: nothing to refuse")

    cfg = grpo.GRPOConfig(model=str(tiny_model), output_dir=str(tmp_path / "run"), max_steps=1, engine="vllm",
                          progress=False, report=False)
    with pytest.raises(ConfigError, match=r"pip install 'tether\[vllm\]'"):
        grpo.train(cfg)


def _vllm_with_cuda() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _vllm_with_cuda(), reason="needs vLLM and a CUDA GPU")
def test_real_vllm_log_probs_agree_with_the_trainer(tiny_model, tokenizer):
    """On a GPU with vLLM: the sampled tokens' log-probs (processed, at the sampling temperature)
    match the trainer's recomputation within bf16 rounding."""
    from tether.online import completion_logps

    engine = vllm_engine.VLLMEngine(str(tiny_model), tokenizer, dtype="fp32", gpu_memory_utilization=0.2)
    r = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=8, n=4, temperature=0.7))
    lm = load_causal_lm(tiny_model)
    lp, _ = completion_logps(lm, r.prompt_ids, r.completion_ids, r.mask, temperature=0.7)
    assert ((lp - r.logprobs).abs() * r.mask).max() < 1e-2
