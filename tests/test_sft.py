import json

import pytest
import torch

from tether import sft
from tether.data import collate, read_rows, tokenize_sft
from tether.modeling import load_causal_lm


def arith_examples(tokenizer, n=8, seed=0):
    from tether.arith import ArithSpec, sft_rows

    exs, _ = tokenize_sft(read_rows(sft_rows(ArithSpec(), n, seed)), tokenizer, 128)
    return exs


@pytest.mark.parametrize("split", [[8], [2, 2, 2, 2], [1, 3, 4]])
def test_gradient_accumulation_matches_one_big_batch(tiny_model, tokenizer, split):
    exs = arith_examples(tokenizer)
    pad = tokenizer.pad_token_id

    def grads(sizes):
        torch.manual_seed(0)
        model = load_causal_lm(tiny_model).train()
        parts, i = [], 0
        for k in sizes:
            parts.append(collate(exs[i:i + k], pad))
            i += k
        loss, n = sft.accumulate_gradients(model, parts)
        return loss, n, [p.grad.clone() for p in model.parameters()]

    loss1, n1, g1 = grads([8])
    loss2, n2, g2 = grads(split)
    assert n1 == n2
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # the per-micro-batch mean (TRL's default) would differ when the micro-batches have
    # different token counts: make sure this split is one where that matters
    if len(split) > 1:
        counts = [collate(exs[:k], pad).n_targets for k in split]
        assert len(set(counts)) > 1 or split == [2, 2, 2, 2]


def test_one_update_is_the_same_with_accumulation(tiny_model, tmp_path):
    def run(micro, name):
        cfg = sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / name), max_steps=1, batch_size=8,
                            micro_batch_size=micro, lr=1e-4, warmup_steps=0, eval_data="none", progress=False,
                            report=False, arith_rows=64, dtype="fp32")
        sft.train(cfg)
        return load_causal_lm(tmp_path / name / "final").state_dict()

    a, b = run(8, "one"), run(2, "four")
    before = load_causal_lm(tiny_model).state_dict()
    assert any(not torch.equal(a[k], before[k]) for k in a)  # the update did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_sft_writes_metrics_checkpoint_and_report(tiny_model, tmp_path):
    cfg = sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / "r"), max_steps=3, batch_size=4,
                        micro_batch_size=2, eval_samples=4, max_new_tokens=4, progress=False, arith_rows=32)
    r = sft.train(cfg)
    recs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == [1, 2, 3]
    assert all(k in recs[1] for k in ("loss", "lr", "grad_norm", "tok_per_s"))
    assert r.eval_before is not None and r.eval_after is not None
    assert (r.run_dir / "report.md").is_file() and (r.run_dir / "report.png").stat().st_size > 1000
    assert (r.final_dir / "model.safetensors").is_file()
    assert (r.run_dir / "checkpoints" / "step-00000003" / "COMPLETE.json").is_file()


def test_refuses_to_mix_into_an_existing_run(tiny_model, tmp_path):
    from tether.config import ConfigError

    kw = dict(model=str(tiny_model), output_dir=str(tmp_path / "r"), max_steps=1, batch_size=2, micro_batch_size=2,
              eval_data="none", progress=False, report=False, arith_rows=8)
    sft.train(sft.SFTConfig(**kw))
    with pytest.raises(ConfigError, match="resume=true.*overwrite=true"):
        sft.train(sft.SFTConfig(**kw))
    sft.train(sft.SFTConfig(**kw, overwrite=True))


def test_overwrite_deletes_only_a_run_folder_that_holds_no_input(tiny_model, tmp_path, monkeypatch):
    """overwrite=true deletes a tether run folder; it refuses a folder that is not one, the working
    directory, and a run folder holding this run's own model ("continue training" into its own run)."""
    from tether.config import ConfigError

    kw = dict(max_steps=1, batch_size=2, eval_data="none", progress=False, report=False, arith_rows=8)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "train.jsonl").write_text("keep\n")
    with pytest.raises(ConfigError, match="not a tether run folder"):
        sft.train(sft.SFTConfig(model=str(tiny_model), output_dir=str(mine), overwrite=True, **kw))
    assert (mine / "train.jsonl").read_text() == "keep\n"
    monkeypatch.chdir(mine)
    with pytest.raises(ConfigError, match="working directory"):
        sft.train(sft.SFTConfig(model=str(tiny_model), output_dir=".", overwrite=True, **kw))
    monkeypatch.chdir(tmp_path)
    first = sft.train(sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / "r"), **kw))
    with pytest.raises(ConfigError, match="lies inside output_dir"):
        sft.train(sft.SFTConfig(model=str(first.final_dir), output_dir=str(tmp_path / "r"), overwrite=True, **kw))
    assert (first.final_dir / "config.json").is_file()
    sft.train(sft.SFTConfig(model=str(tiny_model), output_dir=str(tmp_path / "r"), overwrite=True, **kw))  # a run: gone


def test_micro_batch_defaults_to_the_batch_where_smaller():
    assert sft.SFTConfig(batch_size=8).micro_batch_size == 8
    assert sft.SFTConfig(batch_size=64).micro_batch_size == 32
    with pytest.raises(Exception, match="multiple of micro_batch_size"):
        sft.SFTConfig(batch_size=8, micro_batch_size=3)


def test_resume_accepts_a_moved_run_a_longer_budget_and_other_evaluation(tiny_model, tmp_path):
    """Settings that do not change the trajectory may change on resume: where the run lives, the step
    budget under a constant schedule, evaluation; the steps already run stay bit-identical."""
    import shutil

    kw = dict(model=str(tiny_model), batch_size=2, eval_data="none", progress=False, report=False, arith_rows=16,
              schedule="constant")
    full = sft.train(sft.SFTConfig(output_dir=str(tmp_path / "a"), max_steps=4, **kw))
    sft.train(sft.SFTConfig(output_dir=str(tmp_path / "b"), max_steps=2, **kw))
    shutil.move(tmp_path / "b", tmp_path / "moved")
    resumed = sft.train(sft.SFTConfig(output_dir=str(tmp_path / "moved"), max_steps=4, resume=True, eval_every=2, **kw))
    a = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    b = [json.loads(x) for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [m["step"] for m in b] == [1, 2, 3, 4] and [m["loss"] for m in a] == [m["loss"] for m in b]


def test_sft_learns_on_the_embedded_model(embedded_model, tmp_path):
    """A small fixed budget of SFT lowers the loss and lifts held-out exact-match accuracy."""
    from tether.modeling import default_dtype

    cfg = sft.SFTConfig(model=str(embedded_model), output_dir=str(tmp_path / "learn"), max_steps=150, lr=1e-3,
                        batch_size=64, micro_batch_size=64, eval_samples=200, progress=False, report=False, seed=1,
                        dtype=default_dtype())
    r = sft.train(cfg)
    losses = [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:5]) / 5
    assert r.eval_before["accuracy"] < 0.10
    assert r.eval_after["accuracy"] >= 0.12
    assert r.eval_after["accuracy"] - r.eval_before["accuracy"] >= 0.08 - 1e-9  # k / n: an exact +8 passes


def test_a_non_finite_gradient_stops_before_the_step():
    """A NaN loss's gradient reaches no weight: the run stops with a message (the CLI prints it)."""
    from tether import runs

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    (w * float("nan")).sum().backward()
    with pytest.raises(runs.TrainingDiverged, match="not finite|nan"):
        runs.optimizer_step([w], opt, None, 1.0)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None
    (w * 2).sum().backward()
    assert runs.optimizer_step([w], opt, None, 0.0) == pytest.approx(2 * 3 ** 0.5)
    assert not torch.equal(w.detach(), torch.ones(3))
