"""The embedded model: the shipped build, a deterministic recipe, and a checkpoint transformers' Auto
classes load."""

import hashlib
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether.arith import pretrain_corpus
from tether.embedded import (
    EOS, PAD, SHIPPED_DIR, BuildConfig, build, build_init, ensure_embedded, shipped_model, train_tokenizer,
)


def test_the_default_recipe_is_the_shipped_build_and_it_is_intact(tmp_path, tiny_build_config):
    info = json.loads((SHIPPED_DIR / "build.json").read_text())
    assert ensure_embedded(progress=False, cache_dir=tmp_path) == SHIPPED_DIR
    assert not any(tmp_path.iterdir())  # nothing built, nothing cached
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((SHIPPED_DIR / name).read_bytes()).hexdigest() == digest, name
    # any other recipe is built locally, into a cache folder named by its hash
    assert shipped_model(BuildConfig(seed=1)) is None
    assert shipped_model(BuildConfig(pretrain_dtype="fp32")) is None
    local = ensure_embedded(tiny_build_config, cache_dir=tmp_path, progress=False)
    assert local.parent.name == f"arith-{tiny_build_config.key()}" and (local / "config.json").is_file()


def test_the_learning_tests_start_is_intact_and_is_the_embedded_models_sft(sft_model):
    """The shipped SFT start (tests/assets/arith-sft) is the file its provenance records, made from
    this embedded build, with its tokenizer, and scores near its recorded greedy accuracy (fp32 here,
    bf16 where it was made: a few near-tie problems may flip)."""
    from tether.arith import ArithSpec, eval_rows
    from tether.evaluate import accuracy

    info = json.loads((sft_model / "provenance.json").read_text())
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((sft_model / name).read_bytes()).hexdigest() == digest, name
    assert info["from"]["sha256"] == json.loads((SHIPPED_DIR / "build.json").read_text())["sha256"]["model.safetensors"]
    tok = AutoTokenizer.from_pretrained(sft_model)
    text = "Question: What is 47 - 6?\nAnswer: 47 - 6 = 41"
    assert tok.encode(text) == AutoTokenizer.from_pretrained(SHIPPED_DIR).encode(text)
    model = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    acc = accuracy(model, tok, eval_rows(ArithSpec(), info["greedy_accuracy"]["held_out_prompts"]))["accuracy"]
    assert abs(acc - info["greedy_accuracy"]["this_model"]) <= 0.03, acc


def test_the_recipe_still_describes_the_shipped_tokenizer():
    """The shipped tokenizer is what the default recipe's corpus trains: a change to the corpus or the
    tokenizer recipe without a new shipped build fails here."""
    cfg = BuildConfig()
    lines = pretrain_corpus(cfg.arith, cfg.corpus_facts, cfg.corpus_sentences, cfg.seed)
    rebuilt = train_tokenizer(lines, cfg.vocab_size, cfg.max_position_embeddings)
    assert rebuilt.get_vocab() == AutoTokenizer.from_pretrained(SHIPPED_DIR).get_vocab()


def test_tokenizer_and_weights_are_deterministic(tmp_path, tiny_build_config):
    a, b = tmp_path / "a", tmp_path / "b"
    build_init(tiny_build_config, a)
    build_init(tiny_build_config, b)
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    assert ta.get_vocab() == tb.get_vocab()
    text = "Question: What is 41 + 31?\nAnswer: 41 + 31 = 72"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    # a different seed gives different weights: the check can fail
    c = tmp_path / "c"
    build_init(tiny_build_config.model_copy(update={"seed": 1}), c)
    mc = AutoModelForCausalLM.from_pretrained(c)
    assert not torch.equal(ma.model.embed_tokens.weight, mc.model.embed_tokens.weight)


def test_pretraining_is_deterministic(tmp_path):
    cfg = BuildConfig(corpus_facts=2000, corpus_sentences=500, pretrain_steps=3, pretrain_batch_size=2,
                      pretrain_max_length=64)
    sa = AutoModelForCausalLM.from_pretrained(build(cfg, tmp_path / "a", progress=False)).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(build(cfg, tmp_path / "b", progress=False)).state_dict()
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "init").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], init[k]) for k in sa)  # pretraining changed the weights


def test_tokenizer_shape_and_loading_paths_agree(tiny_model):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(tiny_model)
    fast = PreTrainedTokenizerFast.from_pretrained(tiny_model)
    raw = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert auto.eos_token == EOS and auto.pad_token == PAD
    assert (auto.eos_token_id, auto.pad_token_id) == (0, 1)
    for text in ["What is 7 * 8?", "The cat walks to the river slowly.", "12 - 5 = 7", "<|im_start|>user\nhi<|im_end|>"]:
        ids = auto(text, add_special_tokens=False)["input_ids"]
        assert ids == fast(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
        assert auto.decode(ids) == text
    digits = auto.convert_ids_to_tokens(auto("12345", add_special_tokens=False)["input_ids"])
    assert digits == ["1", "2", "3", "4", "5"]  # one token per digit
    chat = auto.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_checkpoint_round_trips_through_auto_classes(embedded_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(embedded_model)
    tok = AutoTokenizer.from_pretrained(embedded_model)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (256, 4, 4, 2, 2048)
    assert sum(p.numel() for p in model.parameters()) == 3_428_608
    assert (embedded_model / "model.safetensors").is_file()
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    ids = tok(["Question: What is 3 + 4?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert ensure_embedded(progress=False) == embedded_model  # the shipped build, not rebuilt


def test_tether_build_rebuilds_even_the_shipped_recipe(tmp_path, monkeypatch, capsys):
    """``tether build`` is how the shipped model is reproduced: it builds locally, into the cache."""
    from tether import cli, embedded

    built = []

    def fake_build(cfg, out, progress=True):  # the 6-minute build, stood in for
        built.append(cfg)
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text("{}")
        return out / "model"

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "build", fake_build)
    assert cli.main(["build"]) == 0
    assert built == [BuildConfig()]
    assert capsys.readouterr().out.strip() == str(tmp_path / f"arith-{BuildConfig().key()}" / "model")
