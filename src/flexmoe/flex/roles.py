"""Every parameter's role, decided in one place: frozen, shared (federated) or personal.

- personal: grafted experts and their gates, plus LoRA B matrices when ``personal_lora_b`` is set
  (FedSA-LoRA); these never leave the client.
- shared: what is federated. ``lora`` (default): PEFT LoRA adapters on ``target_modules``;
  ``full``: the full weights of ``target_modules``; ``all``: every pretrained weight, experts and
  routers included (naive dense FL, the baseline FLEx argues against).
- frozen: everything else, pretrained experts and routers above all.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from flexmoe.errors import FlexMoEError
from flexmoe.flex.graft import ADAPTER_DTYPE, PERSONAL_PREFIX
from flexmoe.flex.sharing import DEFAULT_TARGETS, SharedConfig

ATTENTION_NAMES = ("self_attn", "attention", "attn")
LORA_ADAPTER = "default"  # the name PEFT gives the one adapter flexmoe injects
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")


class Role(StrEnum):
    FROZEN = "frozen"
    SHARED = "shared"
    PERSONAL = "personal"


def resolve_targets(model: nn.Module, shared: SharedConfig) -> SharedConfig:
    """Map the default q/k/v targets onto models without them (e.g. DeepSeek's MLA projections)."""
    linear = {n.rsplit(".", 1)[-1]: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if shared.target_modules != DEFAULT_TARGETS or any(t in linear for t in DEFAULT_TARGETS):
        return shared
    attention = sorted(
        leaf
        for leaf, path in linear.items()
        if any(part in ATTENTION_NAMES for part in path.split("."))
        and leaf not in OUTPUT_PROJECTIONS
    )
    return replace(shared, target_modules=tuple(attention)) if attention else shared


def add_shared_adapter(model: nn.Module, shared: SharedConfig) -> None:
    """Inject LoRA adapters in place (names keep their base-model paths); no-op unless ``lora``."""
    if shared.mode != "lora":
        return
    has_personal = any(PERSONAL_PREFIX in name for name, _ in model.named_modules())
    config = LoraConfig(
        r=shared.lora_r,
        lora_alpha=shared.lora_alpha,
        lora_dropout=shared.lora_dropout,
        target_modules=list(shared.target_modules),
        exclude_modules=rf".*{PERSONAL_PREFIX}.*" if has_personal else None,
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:
        raise FlexMoEError(
            f"cannot put LoRA on target modules {list(shared.target_modules)}: {error}"
        ) from None
    for name, parameter in model.named_parameters():  # PEFT gives them the base's dtype
        if ".lora_" in name:
            parameter.data = parameter.data.to(ADAPTER_DTYPE)


def materialise_shared_adapter(model: nn.Module) -> None:
    """Give a LoRA adapter injected on the meta device values on the host, initialised as PEFT
    initialises it (A uniform, B zero), so that its start needs no base weights."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.active_adapters:
                module.lora_A[name].to_empty(device="cpu")
                module.lora_B[name].to_empty(device="cpu")
                module.reset_lora_parameters(name, True)


def remove_shared_adapter(model: nn.Module) -> None:
    """Put every LoRA-wrapped module's base layer back in its place (PEFT's ``unload``)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            model.set_submodule(path, module.get_base_layer())
    if hasattr(model, "peft_config"):  # left by inject_adapter_in_model; the next would add to it
        del model.peft_config


def set_shared_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer on or off, leaving which parameters train as it was."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable[name])


def role_of(name: str, shared: SharedConfig) -> Role:
    """The role of the parameter called ``name``."""
    if PERSONAL_PREFIX in name:
        return Role.PERSONAL
    if shared.mode == "all":
        return Role.SHARED
    if shared.mode == "lora":
        if ".lora_" not in name:
            return Role.FROZEN
        return Role.PERSONAL if shared.personal_lora_b and ".lora_B." in name else Role.SHARED
    module_name = name.rsplit(".", 2)[-2]
    return Role.SHARED if module_name in shared.target_modules else Role.FROZEN


def parameter_roles(model: nn.Module, shared: SharedConfig) -> dict[str, Role]:
    return {name: role_of(name, shared) for name, _ in model.named_parameters()}


def set_trainable(model: nn.Module, shared: SharedConfig) -> None:
    """Train shared and personal parameters; freeze the rest."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(role_of(name, shared) is not Role.FROZEN)
