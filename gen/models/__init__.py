"""Backbone networks: the DiT family (DiT and LightningDiT are one class, ``DiT``; DDT reuses its blocks) and
EDM2's magnitude-preserving U-Net (``EDM2UNet``).

Every backbone is a pure network ``net(x, t, y, **options) -> ModelOutput`` with a captured ``.config``
(a ``_target_`` spec): ``gen.utils.build.build(net.config)`` rebuilds it. Presets are the YAML files in
``configs/model/``.
"""

from __future__ import annotations

from gen.models.common import ModelOutput
from gen.models.ddt import DDT
from gen.models.dit import DiT
from gen.models.edm2 import EDM2UNet

__all__ = ["DDT", "DiT", "EDM2UNet", "ModelOutput"]
