"""Model presets for tests: the YAML files of configs/model/ (the one place presets live), built like train.py does.

``model_preset("dit_xl2", patch_size=4, in_channels=4, input_size=32, num_classes=1000)`` loads the preset, applies
the overrides and builds it with the project constructor. ``MICRO`` holds the test-only micro sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gen.utils.build import build

ROOT = Path(__file__).resolve().parents[1]

# Test-only sizes: 2 blocks of width 64 (DiT family), 3 blocks of which 2 encoder (DDT).
MICRO: dict[str, dict[str, Any]] = {
    "dit": {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 4},
    "ddt": {"depth": 3, "hidden_size": 64, "num_heads": 2, "num_encoder_blocks": 2, "patch_size": 4},
}
LIGHTNINGDIT = {"norm": "rms", "ffn": "swiglu", "rope": "axial"}


def preset_spec(name: str) -> dict[str, Any]:
    """The ``_target_`` spec of ``configs/model/<name>.yaml`` (following a ``defaults`` list of one parent)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    parents = cfg.pop("defaults", [])
    spec: dict[str, Any] = {}
    for parent in parents:
        spec.update(preset_spec(str(parent)))
    spec.update(cfg)
    return spec


def model_preset(name: str, **overrides: Any) -> Any:
    """Build a preset with overrides (interface arguments such as in_channels included)."""
    return build({**preset_spec(name), **overrides})


def micro(family: str = "dit", **kw: Any) -> Any:
    """A micro model: ``family`` in {"dit", "lightningdit", "ddt"}; kwargs override (input shape included)."""
    if family == "ddt":
        return build({"_target_": "gen.models.ddt.DDT", **MICRO["ddt"], **kw})
    extra = LIGHTNINGDIT if family == "lightningdit" else {}
    return build({"_target_": "gen.models.dit.DiT", **MICRO["dit"], **extra, **kw})
