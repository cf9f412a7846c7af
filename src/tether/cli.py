"""The ``tether`` command line.

Every training command takes an optional ``--config FILE.yaml`` and ``key=value`` overrides
(which win over the file); ``tether COMMAND --help`` lists every key with its type, default and
meaning. An unknown key or a value of the wrong type stops the command before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .checkpoint import CheckpointError  # noqa: E402
from .config import Config, ConfigError  # noqa: E402
from .runs import TrainingDiverged  # noqa: E402


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass


def _stopped(r) -> int:
    print(f"stopped after step {r.steps}; checkpoint in {r.run_dir / 'checkpoints'}; continue with resume=true")
    return 0


def _cmd_sft(cfg) -> int:
    from .sft import train

    r = train(cfg)
    if r.stopped_early:
        return _stopped(r)
    if r.eval_before is not None:
        print(f"held-out accuracy before: {r.eval_before['accuracy']:.1%}")
    if r.eval_after is not None:
        print(f"held-out accuracy after:  {r.eval_after['accuracy']:.1%}")
    print(f"model:  {r.final_dir}")
    if cfg.report:
        print(f"report: {r.run_dir / 'report.md'}")
    return 0


def _cmd_dpo(cfg) -> int:
    from .dpo import train

    r = train(cfg)
    if r.stopped_early:
        return _stopped(r)
    for name, ev in (("before", r.eval_before), ("after", r.eval_after)):
        if ev:
            shown = ", ".join(f"{k} {ev[k]:.1%}" for k in ("pref_accuracy", "accuracy") if k in ev)
            print(f"held-out {name}: {shown}")
    print(f"model:  {r.final_dir}")
    return 0


def _cmd_reward(cfg) -> int:
    from .reward import train

    r = train(cfg)
    if r.stopped_early:
        return _stopped(r)
    if r.eval_before is not None and r.eval_after is not None:
        print(f"held-out pairwise accuracy: {r.eval_before['pairwise_accuracy']:.1%} -> "
              f"{r.eval_after['pairwise_accuracy']:.1%}")
    print(f"reward model: {r.final_dir}")
    return 0


def _cmd_attributes(cfg) -> int:
    from .attributes import train

    r = train(cfg)
    if r.stopped_early:
        return _stopped(r)
    if r.eval_before is not None and r.eval_after is not None and "rank_accuracy" in r.eval_after:
        print(f"held-out rank accuracy: {r.eval_before['rank_accuracy']:.1%} -> {r.eval_after['rank_accuracy']:.1%}")
    print(f"model: {r.final_dir}")
    return 0


def _online(module: str) -> Callable[[Any], int]:
    """The handler of an online RL command (grpo, ppo, reinforce): train, then say what changed."""

    def handler(cfg) -> int:
        import importlib

        r = importlib.import_module(f".{module}", __package__).train(cfg)
        if r.stopped_early:
            return _stopped(r)
        if r.eval_before is not None and r.eval_after is not None:
            print(f"held-out accuracy: {r.eval_before['accuracy']:.1%} -> {r.eval_after['accuracy']:.1%}")
        print(f"model:  {r.final_dir}")
        if cfg.report:
            print(f"report: {r.run_dir / 'report.md'}")
        return 0

    return handler


def _cmd_quickstart(cfg) -> int:
    from .quickstart import run

    run(cfg)
    return 0


def _cmd_build(cfg) -> int:
    from .embedded import ensure_embedded

    print(ensure_embedded(cfg, progress=True, shipped=False))  # a local build, even of the shipped recipe
    return 0


def _cmd_eval(cfg) -> int:
    from .evaluate import accuracy, load_eval_rows
    from .modeling import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model)
    model, tokenizer = load_causal_lm(path), load_tokenizer(path, cfg.chat_template_kwargs)
    rows = load_eval_rows(cfg.eval_data, cfg.eval_samples, tokenizer=tokenizer)
    if cfg.dtype == "bf16":  # as the online trainers evaluate: the rollout engine, greedy, in bf16
        from .evaluate import engine_accuracy
        from .rollout import TorchEngine

        ev = engine_accuracy(TorchEngine(model, tokenizer, "bf16"), tokenizer, rows, cfg.max_new_tokens)
    else:
        ev = accuracy(model, tokenizer, rows, cfg.max_new_tokens)
    out = {"model": str(path), "accuracy": ev["accuracy"], "n": ev["n"], "samples": ev["samples"][:3]}
    if cfg.samples:
        from .evaluate import sampled_accuracy

        out["sampled"] = sampled_accuracy(model, tokenizer, rows, cfg.samples, cfg.temperature, cfg.max_new_tokens, cfg.seed)
    print(json.dumps(out, indent=1))
    return 0


def _commands() -> dict[str, tuple[type[Config], Callable[[Any], int], str]]:
    """name -> (config class, handler, one-line description). Imports stay light until run."""
    from .attributes import AttributeConfig
    from .dpo import DPOConfig
    from .embedded import BuildConfig
    from .evaluate import EvalConfig
    from .grpo import GRPOConfig
    from .ppo import PPOConfig
    from .quickstart import QuickstartConfig
    from .reinforce import ReinforceConfig
    from .reward import RewardConfig
    from .sft import SFTConfig

    return {
        "quickstart": (QuickstartConfig, _cmd_quickstart,
                       "the whole pipeline on the embedded model: SFT, reward model, DPO, GRPO, PPO, each evaluated; a report"),
        "sft": (SFTConfig, _cmd_sft, "supervised fine-tuning (completion-only loss) of a causal LM"),
        "reward": (RewardConfig, _cmd_reward, "a Bradley-Terry reward model (scalar head) from preference pairs"),
        "attributes": (AttributeConfig, _cmd_attributes,
                       "a multi-attribute reward model: regression heads, or generated 'name: score' ratings"),
        "dpo": (DPOConfig, _cmd_dpo, "direct preference optimisation (15 loss types) from preference pairs"),
        "grpo": (GRPOConfig, _online("grpo"),
                 "GRPO (and dr_grpo, dapo, bnpo, GSPO…): group-relative advantages, clipped updates, no critic"),
        "ppo": (PPOConfig, _online("ppo"), "PPO with a critic (separate value model or value head), GAE, KL penalty"),
        "reinforce": (ReinforceConfig, _online("reinforce"), "REINFORCE with a mean or leave-one-out (RLOO) baseline"),
        "build": (BuildConfig, _cmd_build, "build the embedded arithmetic model locally (or find it in the cache); prints its path. Without it, tether uses the shipped build"),
        "eval": (EvalConfig, _cmd_eval, "greedy exact-match accuracy of a model on held-out prompts"),
    }


def build_parser(commands) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="tether: align language models with human, AI and verifiable feedback.",
        epilog="Run 'tether COMMAND --help' for the options of a command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls, _, desc) in commands.items():
        p = sub.add_parser(name, help=desc, description=f"{desc}\n\n{(cls.__doc__ or '').strip()}",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="options (key=value, or in the --config YAML file):\n" + cls.help_text())
        p.add_argument("--config", metavar="FILE", help="YAML file of options; key=value arguments override it")
        if "resume" in cls.model_fields:
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint (same as resume=true)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. lr=3e-4 packing=true")
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    # --key=value spellings of options (the options themselves are key=value, not argparse flags)
    stray = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (options are key=value)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        build_parser(commands).print_help()
        return 2
    cls, handler, _ = commands[args.command]
    _quiet_transformers()
    try:
        overrides = list(args.overrides) + extra
        if getattr(args, "resume", False):
            overrides.append("resume=true")
        cfg = cls.load(args.config, overrides)
        return handler(cfg)
    except ConfigError as e:
        print(f"tether {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, CheckpointError, TrainingDiverged) as e:  # a missing file or weights, bad data…
        if args.verbose:  # the traceback, for a report
            raise
        print(f"tether {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
