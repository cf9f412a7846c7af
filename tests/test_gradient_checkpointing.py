"""``gradient_checkpointing=true``: the same gradients with fewer activations kept, through the
model's own forward and tether's packed-tree forward, with and without LoRA."""

import json

import pytest
import torch

from tether import grpo, lora, runs, sft
from tether.modeling import load_causal_lm
from tether.online import completion_logps


class Cfg(runs.RunConfig, lora.LoraFields):
    pass


def kept_bytes_and_grads(model, lean: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of tensors autograd keeps for the backward of one packed-tree log-prob forward, and the
    parameter gradients. Checkpointed layers keep theirs inside the checkpoint, out of these hooks'
    sight, and recompute them in the backward."""
    torch.manual_seed(0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    rows = [p for p in prompts for _ in range(3)]
    comp = torch.randint(3, 200, (6, 8))
    mask = torch.ones(6, 8, dtype=torch.long)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = completion_logps(model, rows, comp, mask, 1.0, "fp32", 0, lean=lean)[0]
    lp.sum().backward()
    return sum(kept), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("rank", [0, 4])
def test_same_gradients_fewer_activations(tiny_model, lean, rank):
    def model(checkpointing: bool):
        torch.manual_seed(1)  # the same adapters in both (A's initialisation is random)
        m = lora.apply(load_causal_lm(tiny_model), Cfg(lora_rank=rank))
        with torch.no_grad():  # B = 0 would give A no gradient: make the adapters matter
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        return runs.train_mode(m, Cfg(lora_rank=rank, gradient_checkpointing=checkpointing))

    plain, remat = model(False), model(True)
    kept_plain, g_plain = kept_bytes_and_grads(plain, lean)
    kept_remat, g_remat = kept_bytes_and_grads(remat, lean)
    assert g_plain.keys() == g_remat.keys() and g_plain
    assert all(torch.allclose(g_plain[k], g_remat[k], atol=1e-6) for k in g_plain)
    assert kept_remat < 0.5 * kept_plain, (kept_remat, kept_plain)


def test_trainers_train_alike_with_checkpointing(tiny_model, tmp_path):
    def losses(run_dir):
        return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    common = dict(model=str(tiny_model), max_steps=3, batch_size=8, micro_batch_size=4, arith_rows=64,
                  eval_data="none", progress=False, report=False, dtype="fp32")
    a = sft.train(sft.SFTConfig(output_dir=str(tmp_path / "a"), **common))
    b = sft.train(sft.SFTConfig(output_dir=str(tmp_path / "b"), gradient_checkpointing=True, **common))
    assert losses(a.run_dir) == pytest.approx(losses(b.run_dir), rel=1e-5)
    online = dict(model=str(tiny_model), max_steps=2, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                  eval_data="none", progress=False, report=False, lr=1e-2, ema_decay=0.0, dtype="fp32", beta=0.1)
    c = grpo.train(grpo.GRPOConfig(output_dir=str(tmp_path / "c"), **online))
    d = grpo.train(grpo.GRPOConfig(output_dir=str(tmp_path / "d"), gradient_checkpointing=True, **online))
    assert losses(c.run_dir) == pytest.approx(losses(d.run_dir), rel=1e-5, abs=1e-9)


def test_compile_and_checkpointing_together_are_refused():
    with pytest.raises(ValueError, match="torch_compile=true and gradient_checkpointing=true"):
        sft.SFTConfig(torch_compile=True, gradient_checkpointing=True)
