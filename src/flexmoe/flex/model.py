"""``FlexModel``: a base MoE model with grafted personal experts and a shared adapter.

The PEFT-like entry point. ``FlexModel.graft`` selects and grafts experts from local data;
``save_pretrained`` writes the client's personal state (grafted experts, gates and any personal
LoRA) as safetensors plus a JSON config; ``from_pretrained`` puts it back onto the same base model.
Shared and personal state dicts use the base model's own parameter names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flexmoe import __version__
from flexmoe.errors import FlexMoEError
from flexmoe.flex.config import FlexConfig
from flexmoe.flex.graft import (
    ADAPTER_DTYPE,
    LayerGraft,
    apply_grafts,
    grafted_blocks,
    plan_grafts,
    remove_grafts,
)
from flexmoe.flex.moe import find_moe_blocks
from flexmoe.flex.roles import (
    Role,
    add_shared_adapter,
    materialise_shared_adapter,
    parameter_roles,
    remove_shared_adapter,
    resolve_targets,
    set_shared_adapter_enabled,
    set_trainable,
)
from flexmoe.flex.selection import Batch, LayerChoice, select_experts
from flexmoe.flex.sharing import SharedConfig
from flexmoe.io import atomic_write, atomic_write_text, read_json
from flexmoe.models.loading import (
    FINGERPRINT_VERSION,
    fingerprint,
    load_config,
    load_model,
    meta_model,
)

CONFIG_NAME = "flexmoe_config.json"
PERSONAL_WEIGHTS = "personal.safetensors"
SHARED_WEIGHTS = "shared.safetensors"
GRAFT_PLAN_KEY = "flexmoe_grafts"  # personal weights' metadata: [layer, experts, sizes] each


class FlexModel(nn.Module):
    """A causal LM whose MoE blocks carry grafted experts, with parameter roles applied."""

    def __init__(
        self, base: nn.Module, grafts: Sequence[LayerGraft] = (), config: FlexConfig | None = None
    ) -> None:
        super().__init__()
        config = config or FlexConfig()
        self.config = replace(config, shared=resolve_targets(base, config.shared))
        self.grafts = list(grafts)
        self.base_fingerprint = fingerprint(base)
        apply_grafts(base, self.grafts, self.config.gate_bias, self.config.gate_with_bias)
        was_training = base.training
        add_shared_adapter(base, self.config.shared)
        set_trainable(base, self.config.shared)
        self.model = base.train(was_training)  # new modules (LoRA dropout) take the base's mode

    @classmethod
    def graft(
        cls,
        base: nn.Module,
        batches: Sequence[Batch],
        config: FlexConfig | None = None,
        progress: bool = False,
    ) -> tuple[FlexModel, list[LayerChoice]]:
        """Select experts on ``batches`` of local data and graft them; returns the choices too."""
        config = config or FlexConfig()
        views = find_moe_blocks(base)
        choices = select_experts(
            base,
            views,
            batches,
            config.experts_per_layer,
            config.selection,
            progress,
            config.seed,
            config.selection_token_budget,
        )
        return cls(base, plan_grafts(views, choices, config.size_ratio), config), choices

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def base_only(self) -> Iterator[FlexModel]:
        """Compute as the base model within the block: grafts and LoRA switched off."""
        blocks = grafted_blocks(self.model)
        for block in blocks:
            block.enabled = False
        set_shared_adapter_enabled(self.model, False)
        try:
            yield self
        finally:
            set_shared_adapter_enabled(self.model, True)
            for block in blocks:
                block.enabled = True

    def unload(self) -> nn.Module:
        """Take grafts and LoRA off and freeze the base again; returns the base model.

        As PEFT's ``unload``: the base is as it was unless the shared mode trained its weights.
        """
        remove_grafts(self.model)
        remove_shared_adapter(self.model)
        self.model.requires_grad_(False)
        base, self.model, self.grafts = self.model, None, []
        return base

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def roles(self) -> dict[str, Role]:
        return parameter_roles(self.model, self.config.shared)

    def state_of(self, role: Role) -> dict[str, torch.Tensor]:
        """Detached copies of the parameters holding ``role``, by name."""
        roles = self.roles()
        return {
            name: p.detach().clone()
            for name, p in self.model.named_parameters()
            if roles[name] is role
        }

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_of(Role.SHARED)

    def personal_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_of(Role.PERSONAL)

    def load_state_of(self, role: Role, state: dict[str, torch.Tensor]) -> None:
        """Overwrite every parameter holding ``role`` from ``state``; keys must match exactly."""
        expected = {n for n, r in self.roles().items() if r is role}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise FlexMoEError(
                f"{role} state does not fit this model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        parameters = dict(self.model.named_parameters())
        wrong = [n for n, v in state.items() if v.shape != parameters[n].shape]
        if wrong:
            raise FlexMoEError(
                f"{role} state does not fit this model: {wrong[0]} has shape "
                f"{tuple(state[wrong[0]].shape)}, not {tuple(parameters[wrong[0]].shape)}"
            )
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def save_pretrained(self, directory: str | Path, include_shared: bool = False) -> Path:
        """Write personal weights (and, if asked, shared ones) plus the config, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_tensors(
            self.personal_state_dict(), directory / PERSONAL_WEIGHTS, _plan_of(self.grafts)
        )
        if include_shared:
            _save_tensors(self.shared_state_dict(), directory / SHARED_WEIGHTS)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self._config_dict(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory: str | Path) -> FlexModel:
        """Put a saved personal state (and shared state, if saved) back onto ``base``.

        A damaged or inconsistent adapter is one error naming its file: a config that does not
        parse, weights that do not load, a base other than the one it was made for, or grafts
        that disagree with the plan its weights were saved with.
        """
        directory = Path(directory)
        saved = _read_config(directory)
        personal, metadata = _load_tensors(directory / PERSONAL_WEIGHTS)
        if saved.fingerprint_version != FINGERPRINT_VERSION:
            raise FlexMoEError(
                f"the adapter in {str(directory)!r} was made by an older flexmoe, whose base "
                "fingerprint this one cannot check; graft it again"
            )
        if fingerprint(base) != saved.fingerprint:
            raise FlexMoEError(
                f"the adapter in {str(directory)!r} was made for base model "
                f"{saved.base_name!r}, not for this one; load it onto that base model"
            )
        plan = _plan_of(saved.grafts)
        if metadata.get(GRAFT_PLAN_KEY, plan) != plan:
            raise FlexMoEError(
                f"{str(directory / CONFIG_NAME)!r} names grafts {plan} but its weights were "
                f"saved for {metadata[GRAFT_PLAN_KEY]}; the config was edited or belongs to "
                "other weights"
            )
        try:
            model = cls(base, saved.grafts, saved.config)
            model.load_state_of(Role.PERSONAL, personal)
            if (directory / SHARED_WEIGHTS).is_file():
                model.load_state_of(Role.SHARED, _load_tensors(directory / SHARED_WEIGHTS)[0])
        except FlexMoEError as error:
            raise FlexMoEError(f"the adapter in {str(directory)!r} does not fit: {error}") from None
        return model

    def _config_dict(self) -> dict:
        base_config = self.model.config
        return {
            "flexmoe_version": __version__,
            "base_model": {
                "name_or_path": getattr(base_config, "name_or_path", ""),
                "model_type": base_config.model_type,
                "fingerprint": self.base_fingerprint,
                "fingerprint_version": FINGERPRINT_VERSION,
            },
            "config": asdict(self.config),
            "gate": "sigmoid(w . x + b), w initialised from the source expert's router row, "
            "b from config.gate_bias",
            "grafts": [g.to_dict() for g in self.grafts],
        }


def initial_shared_state(name_or_path: str, shared: SharedConfig) -> dict[str, torch.Tensor]:
    """The shared parameters a federation starts from, made from the model's config alone
    when they are LoRA (a server need not hold a base of billions of parameters), from its
    weights when they are pretrained weights themselves."""
    if shared.trains_base_weights:
        base, _ = load_model(name_or_path)
        return FlexModel(base, config=FlexConfig(shared=shared)).shared_state_dict()
    skeleton = meta_model(load_config(name_or_path), ADAPTER_DTYPE)
    flex = FlexModel(skeleton, config=FlexConfig(shared=shared))
    materialise_shared_adapter(flex.model)
    return flex.shared_state_dict()


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter's config as read from its ``flexmoe_config.json``."""

    fingerprint: str
    fingerprint_version: int
    base_name: str
    grafts: list[LayerGraft]
    config: FlexConfig


def _read_config(directory: Path) -> SavedAdapter:
    path = directory / CONFIG_NAME
    saved = read_json(path, "give a folder written by 'flexmoe graft' or FlexModel.save_pretrained")
    try:
        base = saved["base_model"]
        return SavedAdapter(
            fingerprint=str(base["fingerprint"]),
            fingerprint_version=int(base.get("fingerprint_version", 1)),
            base_name=str(base.get("name_or_path", "")),
            grafts=[LayerGraft.from_dict(g) for g in saved["grafts"]],
            config=FlexConfig.from_dict(saved["config"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError, FlexMoEError) as error:
        raise FlexMoEError(
            f"{str(path)!r} is not a valid adapter config ({type(error).__name__}: {error}); "
            "make the adapter again"
        ) from None


def _plan_of(grafts: Sequence[LayerGraft]) -> str:
    """Which experts are grafted where, saved with the weights to check the config by."""
    return json.dumps([[g.layer, list(g.source_experts), g.intermediate_sizes] for g in grafts])


def _save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, graft_plan: str | None = None
) -> None:
    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = None if graft_plan is None else {GRAFT_PLAN_KEY: graft_plan}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata, or one error naming the damaged file."""
    if not path.is_file():
        raise FlexMoEError(f"{str(path)!r} is missing; the adapter is incomplete, make it again")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise FlexMoEError(f"{str(path)!r} is damaged ({error}); make the adapter again") from None
