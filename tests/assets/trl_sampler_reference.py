"""TRL 1.16.0's own sampler-mismatch correction and entropy terms on fixed tensors: writes
trl_sampler_reference.json and trl_entropy_reference.json.

    /tmp/peer-venv/bin/python tests/assets/trl_sampler_reference.py /tmp/peer-fixture

(``bash shared/peer/setup.sh`` makes that venv, ``make_fixture.py`` the fixture.) The shared reference
(``shared/reference``) has no case of TRL's vLLM importance-sampling correction nor of its off-policy
sequence mask: "none of these apply" without vLLM. This script gets them from TRL's code the way
``shared/peer/extract_loss_reference.py`` gets the others: a real ``GRPOTrainer`` per case, its
``_generate`` replaced by fixed completions with fixed sampler log-probs (what vLLM returns), its
``_get_per_token_logps_and_entropies`` by fixed tensors (the trainer's π_old while scoring, then π with
gradient in ``compute_loss``), and ``use_vllm`` switched on after construction so that TRL's own
``_generate_and_score_completions`` computes the importance-sampling ratio and its ``_compute_loss``
applies it. Nothing of the maths is re-implemented here. float64 throughout.

The entropy cases (``top_entropy_quantile``, ``entropy_coef``, ``use_adaptive_entropy``) give
``compute_loss`` fixed per-token entropies too, with gradient, and record the adaptive controller's
coefficient and entropy after the update.
"""

import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

B, NGEN, T = 8, 4, 16


def inputs(seed: int = 2027, entropy: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    r = lambda t: torch.round(t * mask, decimals=6)  # noqa: E731
    old = -(0.05 + 2.95 * torch.rand(B, T, generator=g, dtype=torch.float64))
    # the sampler: close to π_old on most tokens, far on some (ratios past 3 and under 1/3)
    sampler = old + 0.15 * torch.randn(B, T, generator=g, dtype=torch.float64)
    far = torch.rand(B, T, generator=g) < 0.12
    sampler = torch.where(far, old + 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64), sampler)
    logps = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)  # π after some updates
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    out = {"mask": mask, "old": r(old.clamp(max=-1e-3)), "sampler": r(sampler.clamp(max=-1e-3)),
           "logps": r(logps.clamp(max=-1e-3)), "ref": r(ref.clamp(max=-1e-3)),
           "advantages": torch.round(torch.randn(B, generator=g, dtype=torch.float64), decimals=6),
           "lengths": lengths}
    if entropy:  # drawn after the others, so that those stay the sampler cases' tensors
        out["entropy"] = r(0.01 + 3 * torch.rand(B, T, generator=g, dtype=torch.float64))
    return out


def run_case(fixture: str, outdir: str, inp: dict, cfg: dict, on_policy: bool, last_entropy: float | None = None) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl import GRPOConfig, GRPOTrainer

    cfg = dict(cfg)
    correction = cfg.pop("vllm_importance_sampling_correction", True)
    args = GRPOConfig(output_dir=outdir, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                      per_device_train_batch_size=B, num_generations=NGEN, max_completion_length=T, use_vllm=False,
                      **cfg)
    model_dir = os.path.join(fixture, "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(os.path.join(fixture, "prompts.jsonl"))][:2]
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list(rows * 4), processing_class=tok)
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, correction
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()

    n = inp["lengths"].tolist()
    comp_ids = [[5 + (i * 7 + t) % 1000 for t in range(k)] for i, k in enumerate(n)]
    sampler_lists = [inp["sampler"][i, :k].tolist() for i, k in enumerate(n)]

    def fake_generate(prompts):
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return prompt_ids, comp_ids, None, ["x"] * B, sampler_lists, {}, None, []

    phase = {"now": "score"}
    logps = (inp["old"] if on_policy else inp["logps"]).clone().requires_grad_(True)
    entropy = (inp["entropy"] if "entropy" in inp else torch.zeros_like(logps)).clone().requires_grad_(True)

    def fixed_logps(model, *a, **k):
        if phase["now"] == "score":
            return (inp["ref"] if model is trainer.ref_model and model is not None else inp["old"]).clone(), None, None
        return logps, entropy, None

    trainer._generate = fake_generate
    trainer._get_per_token_logps_and_entropies = fixed_logps
    with torch.no_grad():
        batch = trainer._generate_and_score_completions([r for r in rows for _ in range(NGEN)])
    batch["advantages"] = inp["advantages"]
    phase["now"] = "loss"
    if last_entropy is not None:  # the adaptive controller's state from an earlier update
        trainer._last_world_entropy = last_entropy
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    is_ratio = batch.get("importance_sampling_ratio")
    out = {"loss": loss.item(), "dloss_dlogps": logps.grad.tolist(),
           "importance_sampling_ratio": None if is_ratio is None else is_ratio.double().tolist()}
    if "entropy" in inp:
        out.update(dloss_dentropy=entropy.grad.tolist() if entropy.grad is not None else None,
                   entropy_coef_after=trainer.entropy_coef, last_entropy_after=trainer._last_world_entropy)
    return out


def write(doc_cases: list, inp: dict, name: str, note: str) -> None:
    import trl

    doc = {"description": __doc__.split("\n\n")[0] + " See the script for how TRL is called. " + note,
           "trl": trl.__version__, "torch": torch.__version__,
           "inputs": {k: v.tolist() for k, v in inp.items()}, "cases": doc_cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    with open(path, "w") as f:
        json.dump(doc, f)
    print("wrote", path)


def entropy_cases(fixture: str, outdir: str) -> None:
    inp = inputs(entropy=True)
    base = {"beta": 0.04, "epsilon": 0.2, "loss_type": "dapo", "vllm_importance_sampling_mode": "token_truncate"}
    cases = [({**base, "top_entropy_quantile": q}, False, None) for q in (0.2, 0.5, 0.0)]
    cases += [({**base, "loss_type": lt, "top_entropy_quantile": 0.3}, False, None) for lt in ("grpo", "bnpo", "dr_grpo")]
    cases += [({**base, "entropy_coef": c}, False, None) for c in (0.01, 0.1)]
    cases += [({**base, "entropy_coef": 0.05, "top_entropy_quantile": 0.2}, False, None),
              ({**base, "loss_type": "grpo", "entropy_coef": 0.05}, True, None),
              ({**base, "vllm_importance_sampling_correction": False, "entropy_coef": 0.05,
                "top_entropy_quantile": 0.5}, False, None)]
    adaptive = {**base, "use_adaptive_entropy": True, "entropy_coef": 0.02, "entropy_coef_delta": 0.005}
    # the mean entropy here is ~1.5: a target above it raises the coefficient, one below lowers it; the
    # coefficient applies when the previous update's entropy was at or below the target
    cases += [({**adaptive, "entropy_target": 2.0}, False, float("inf")),  # first update: not applied yet
              ({**adaptive, "entropy_target": 2.0}, False, 1.0),
              ({**adaptive, "entropy_target": 1.0}, False, 0.5),
              ({**adaptive, "entropy_target": 3.0, "top_entropy_quantile": 0.5, "entropy_coef_max": 0.022}, False, 1.0)]
    out = []
    for cfg, on_policy, last in cases:
        res = run_case(fixture, outdir, inp, cfg, on_policy, last)
        out.append({"config": cfg, "on_policy": on_policy, "last_entropy": last, **res})
        print(json.dumps(cfg), on_policy, last, res["loss"], flush=True)
    write(out, inp, "trl_entropy_reference.json", "on_policy: π = π_old; last_entropy: the adaptive controller's "
          "entropy of the previous update (inf: none yet); *_after: its state after this update.")


def main() -> None:
    fixture = sys.argv[1]
    outdir = "/tmp/trl-sampler-ref"
    torch.set_default_dtype(torch.float64)
    entropy_cases(fixture, outdir)
    inp = inputs()
    base = {"beta": 0.04, "epsilon": 0.2, "loss_type": "dapo"}
    modes = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    cases = [({**base, "vllm_importance_sampling_mode": m}, False) for m in modes]
    cases += [({**base, "vllm_importance_sampling_mode": m, "vllm_importance_sampling_clip_min": 0.5,
                "vllm_importance_sampling_clip_max": 2.0}, False) for m in modes]
    cases += [({**base, "vllm_importance_sampling_mode": m}, True) for m in ("token_truncate", "sequence_mask")]
    cases += [({**base, "loss_type": lt, "vllm_importance_sampling_mode": "token_truncate"}, False)
              for lt in ("grpo", "dr_grpo", "cispo", "sapo", "vespo")]
    cases += [({**base, "importance_sampling_level": "sequence", "vllm_importance_sampling_mode": "sequence_mask"}, False),
              ({**base, "vllm_importance_sampling_mode": "token_mask", "vllm_importance_sampling_clip_min": 0.5,
                "vllm_importance_sampling_clip_max": None}, False),
              ({**base, "vllm_importance_sampling_mode": "sequence_mask", "off_policy_mask_threshold": 0.05}, False),
              ({**base, "vllm_importance_sampling_correction": False, "off_policy_mask_threshold": 0.05}, False),
              ({**base, "beta": 0.0, "vllm_importance_sampling_mode": "token_truncate"}, False)]
    out = []
    for cfg, on_policy in cases:
        res = run_case(fixture, outdir, inp, cfg, on_policy)
        out.append({"config": cfg, "on_policy": on_policy, **res})
        print(json.dumps(cfg), on_policy, res["loss"], flush=True)
    write(out, inp, "trl_sampler_reference.json", "on_policy: π = π_old (the first update after sampling).")


if __name__ == "__main__":
    main()
