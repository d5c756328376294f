"""FLEx, the method: find a model's MoE layers, select the experts that best reconstruct a
client's data, graft them as personal experts, and assign every parameter a role.

Read bottom to top, as the import contract in pyproject.toml orders them: ``moe`` (a view of
any transformers MoE block) and ``sharing`` (what a federation shares), ``config``
(``FlexConfig``: what a client grafts, its declared settings), ``selection`` (which experts),
``graft`` (personal experts behind a sigmoid gate), ``roles`` (shared, personal or frozen),
``model`` (``FlexModel``, the PEFT-like wrapper).

The names below load on first use, so that ``flexmoe.flex.config`` and ``flexmoe.flex.sharing``
(read by the settings) import no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexmoe.flex.config import FlexConfig, GraftSettings
    from flexmoe.flex.graft import LayerGraft
    from flexmoe.flex.model import FlexModel, initial_shared_state
    from flexmoe.flex.moe import MoEBlockView, find_moe_blocks
    from flexmoe.flex.roles import Role, parameter_roles
    from flexmoe.flex.selection import LayerChoice, select_experts
    from flexmoe.flex.sharing import SharedConfig

_EXPORTS = {
    "FlexConfig": "config",
    "GraftSettings": "config",
    "FlexModel": "model",
    "initial_shared_state": "model",
    "LayerChoice": "selection",
    "select_experts": "selection",
    "LayerGraft": "graft",
    "MoEBlockView": "moe",
    "find_moe_blocks": "moe",
    "Role": "roles",
    "parameter_roles": "roles",
    "SharedConfig": "sharing",
}
__all__ = [
    "FlexConfig",
    "FlexModel",
    "GraftSettings",
    "LayerChoice",
    "LayerGraft",
    "MoEBlockView",
    "Role",
    "SharedConfig",
    "find_moe_blocks",
    "initial_shared_state",
    "parameter_roles",
    "select_experts",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flexmoe.flex' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flexmoe.flex.{_EXPORTS[name]}"), name)
