"""``torch_compile=true``: the same training maths through inductor (the comparison is slow: compiling takes
minutes on 2 cores), and a clear error where inductor cannot build."""

import pytest
import torch

from tether import dpo, reward, sft
from tether.modeling import has_cxx_compiler
from tether.runlog import read_metrics


def losses(run_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(), reason="inductor needs a C++ compiler on CPU")
def test_torch_compile_trains_like_eager(tiny_model, tmp_path):
    """Three fp32 steps each of SFT, DPO and the reward model give the losses of eager mode (to 1e-4: inductor fuses and
    reorders float32 sums), and the compiled graphs did run: dynamo counts the frames it compiled. A
    forward without gradients (generation, scoring) stays eager and compiles nothing more; the state
    dict keeps its names."""
    from torch._dynamo.utils import counters

    def run(flag: bool) -> tuple[list[float], ...]:
        common = dict(model=str(tiny_model), max_steps=3, batch_size=8, micro_batch_size=4, eval_data="none",
                      progress=False, report=False, torch_compile=flag, dtype="fp32")
        s = sft.train(sft.SFTConfig(output_dir=str(tmp_path / f"sft-{flag}"), arith_rows=64, **common))
        d = dpo.train(dpo.DPOConfig(output_dir=str(tmp_path / f"dpo-{flag}"), arith_pairs=32,
                                    loss_type=["sigmoid", "sft"], **common))
        r = reward.train(reward.RewardConfig(output_dir=str(tmp_path / f"rm-{flag}"), arith_pairs=32, **common))
        return losses(s.run_dir), losses(d.run_dir), losses(r.run_dir)

    torch._dynamo.reset()
    counters.clear()
    eager = run(False)
    assert not counters["stats"]["unique_graphs"]
    compiled = run(True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the decoder block's forward (and its backward), shared by every block and model

    from tether.modeling import compile_blocks, load_causal_lm

    model = load_causal_lm(tiny_model)
    keys = list(model.state_dict())
    compile_blocks(model)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    assert counters["stats"]["unique_graphs"] == graphs
    assert list(model.state_dict()) == keys
    for e, c in zip(eager, compiled):
        assert len(e) == len(c) == 3
        assert c == pytest.approx(e, rel=1e-4, abs=1e-5)


def test_torch_compile_without_a_compiler_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    import shutil

    from tether.config import ConfigError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / "sft"), max_steps=1, arith_rows=8,
                        eval_data="none", progress=False, report=False, torch_compile=True)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        sft.train(cfg)
