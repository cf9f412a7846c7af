"""LoRA adapters (Hu et al. 2021) on the trained model, through ``peft``.

W x becomes W x + (α/r) B A x for each targeted linear layer, with A (r × in) and B (out × r)
trained and W frozen; B starts at zero, so training starts from the model itself. ``peft`` injects
the adapters in place (:func:`peft.inject_adapter_in_model`): the model keeps its class and its
``base_model`` backbone, so every tether path runs on it unchanged, and the few that read weights
directly (the fused decode step and training forward of :mod:`tether.decoding`) read the effective
weight W + (α/r) B A (:func:`linear_weight`).

- **The reference is the model with its adapters off** (:func:`as_reference`): no second copy in
  memory, as TRL and OpenRLHF do with LoRA.
- **Checkpoints hold the adapter only** (``adapter_config.json`` + ``adapter_model.safetensors``, in
  peft's format, naming the base model), so resuming reloads the base and the adapter;
  ``final/`` is the merged model, a plain transformers folder that every command loads, with the
  adapter alone in ``final/adapter/``. :func:`tether.modeling.load_causal_lm` loads an adapter folder
  as its merged model.
- **vLLM holds the merged model**: at each sync it loads :func:`plain_parameters`, the merged weights
  under the plain model's names. The online trainers' weight average covers the adapters alone
  (:class:`tether.online.WeightAverage`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from pydantic import Field, model_validator

from .config import Config, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # how peft's own PeftModel names the weights it saves


class LoraFields(Config):
    """The LoRA fields of the trainers (SFT, DPO, GRPO, PPO, REINFORCE, reward and attribute models)."""

    lora_rank: int = Field(0, ge=0, description="LoRA rank r (0: train every weight); the base weights stay frozen and the reference is the model with its adapters off")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scale numerator: the update is (lora_alpha / lora_rank) B A")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input while training (needs disable_dropout=false)")
    lora_target_modules: str | list[str] = Field("all-linear", description="linear layers that get adapters: 'all-linear' (every one but the LM head) or module names such as [q_proj, v_proj]")

    @model_validator(mode="after")
    def _check_lora(self):
        if self.lora_dropout and getattr(self, "disable_dropout", False):
            raise ValueError("lora_dropout > 0 has no effect while disable_dropout=true (the trainer's log-probs must be "
                             "the sampler's); set disable_dropout=false to use it")
        if not self.lora_rank and self.lora_target_modules != type(self).model_fields["lora_target_modules"].default:
            raise ValueError("lora_target_modules has no effect without lora_rank (> 0: the adapters' rank)")
        return self


def apply(model: torch.nn.Module, cfg: LoraFields, train_whole: tuple[str, ...] = ()) -> torch.nn.Module:
    """Inject fresh adapters into ``model`` as ``cfg`` asks (nothing when ``lora_rank`` is 0); only
    the adapters train, and the modules named in ``train_whole`` (a reward model's new head: peft's
    ``modules_to_save``, a trained copy saved with the adapter)."""
    if not cfg.lora_rank:
        return model
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules, bias="none",
                        modules_to_save=list(train_whole) or None)
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, and says so
            warnings.filterwarnings("ignore", "fan_in_fan_out is set to False", UserWarning)
            model = inject_adapter_in_model(config, model)
    except ValueError as e:  # target modules not found in the model
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r}: {e}") from None
    _train_adapters_only(model)
    return model


def _train_adapters_only(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or ".modules_to_save." in name)


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (active or not)."""
    return bool(getattr(model, "peft_config", None))


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


@contextlib.contextmanager
def as_reference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` as the reference policy: with its adapters off, if it has any, and in eval mode,
    restored on exit. A separate reference model (no adapters) passes through unchanged."""
    if not has_adapters(model):
        yield model
        return
    layers = [m for _, m in _lora_layers(model)]
    was = model.training
    model.eval()
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        model.train(was)


def mergeable(model: torch.nn.Module) -> bool:
    """Whether every adapter of ``model`` is plain LoRA whose effect is its effective weight
    (:func:`linear_weight`): no DoRA, no LoRA bias, no dropout active. True without adapters."""
    if not has_adapters(model):
        return True
    for _, m in _lora_layers(model):
        if m.merged:
            return False
        for a in m.active_adapters:
            if a not in m.lora_A:
                continue
            drop = m.lora_dropout[a]
            if m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) or (
                    m.training and isinstance(drop, torch.nn.Dropout) and drop.p > 0):
                return False
            if not isinstance(m.lora_A[a], torch.nn.Linear):  # embeddings, convolutions
                return False
    return True


def linear_weight(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) a linear layer applies: W, or with LoRA adapters active
    W + Σ_a (α_a/r_a) B_a A_a (peft's ``get_delta_weight``: differentiable in A and B, transposed for
    GPT-2's Conv1D layers), where :func:`mergeable` holds."""
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
    w = base.weight
    if hasattr(m, "lora_A") and not m.disable_adapters:
        for a in m.active_adapters:
            if a in m.lora_A:
                w = w + m.get_delta_weight(a)
    return w, base.bias


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its adapters merged in (:func:`unload`); ``model`` itself is untouched."""
    return unload(copy.deepcopy(model))


def unload(out: torch.nn.Module) -> torch.nn.Module:
    """``out`` with its adapters merged into the base weights and removed (and the trained copies of
    whole modules in place of the originals), in place: a plain transformers model of the same class."""
    from peft.utils import ModulesToSaveWrapper

    for name, m in list(out.named_modules()):
        if isinstance(m, ModulesToSaveWrapper):
            plain = m.original_module if m.disable_adapters else m.modules_to_save["default"]
        elif hasattr(m, "lora_A") and hasattr(m, "get_base_layer"):
            plain = m.get_base_layer()
            with torch.no_grad():
                plain.weight.copy_(linear_weight(m)[0])
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, plain)
    del out.peft_config
    out.requires_grad_(True)
    return out


def plain_parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model``'s parameters (detached) under the names of the plain model, adapters merged in: what
    :func:`merged_copy` holds, without copying the model (what a vLLM engine loads at each sync)."""
    out = []
    for name, p in model.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            owner, _, leaf = name.rpartition(".base_layer.")
            p = linear_weight(model.get_submodule(owner))[0] if leaf == "weight" else p
            name = f"{owner}.{leaf}"
        out.append((name.replace(".modules_to_save.default.", "."), p.detach()))
    return out


def save_adapter(model: torch.nn.Module, folder: str | Path) -> None:
    """Write ``model``'s adapter to ``folder`` in peft's format (loadable by
    ``peft.PeftModel.from_pretrained(base, folder)``), naming the folder the base model was loaded
    from as its base."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config["default"])
    config.base_model_name_or_path = str(Path(model.name_or_path).resolve())
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(model)
    save_file({_PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder names."""
    base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ConfigError(f"{path} is a LoRA adapter whose base model {base!r} is not a local folder")
    return base


def load_adapter(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """``model`` (the base) with the adapter saved in ``folder`` injected and loaded, trainable."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = inject_adapter_in_model(LoraConfig.from_pretrained(str(folder)), model)
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(Path(folder) / ADAPTER_WEIGHTS)).items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if ".lora_" in k or ".modules_to_save." in k]
    if missing:
        raise ConfigError(f"the adapter in {folder} lacks {len(missing)} of the model's adapter weights, e.g. {missing[0]}")
    _train_adapters_only(model)
    return model


def load_merged(folder: str | Path, load_base: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    """The model an adapter folder stands for: its base (loaded by ``load_base``) with the adapter
    merged in, named after the folder (so that an adapter trained on it names this one as its base)."""
    model = unload(load_adapter(load_base(adapter_base(folder)), folder))
    model.name_or_path = str(folder)
    return model
