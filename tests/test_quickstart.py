import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, embedded_model):
    """The README's main job: SFT lands in the 20-60% band, then the reward model, DPO, GRPO and PPO
    (the online stages shortened here: their learning is tested in test_online_learning.py)."""
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "tether.cli", "quickstart", f"output_dir={out}", "progress=false",
                        "grpo_steps=8", "ppo_steps=8"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy: pretrained" in r.stdout and "report:" in r.stdout and "checkpoint:" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["accuracy"]
    # accuracies are k / n: exact gains pass (1e-9 for the rounding)
    assert 0.20 <= acc["sft"] <= 0.60 and acc["sft"] - acc["pretrained"] >= 0.15 - 1e-9
    # DPO's gain depends on where this host's SFT stopped (docs/results.md: +0.7 to +14.4 points over SFT
    # seeds); that DPO learns is tested from a fixed start in test_dpo.py, here only that it does no harm
    assert acc["dpo"] >= acc["sft"] - 1e-9
    assert summary["dpo_preference_accuracy"] >= 0.80 and summary["reward_pairwise_accuracy"] >= 0.65
    report = (out / "report.md").read_text()
    assert all(f"| {stage} |" in report for stage in ("SFT", "DPO", "GRPO", "PPO"))
    assert (out / "report.png").stat().st_size > 10_000
    for stage in ("grpo", "ppo"):
        assert 0 <= acc[stage] <= 1 and 0 <= summary[f"{stage}_final"]["kl"] < 1.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
