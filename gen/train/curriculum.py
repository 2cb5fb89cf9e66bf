"""The diffusion method with the denoising-difficulty curriculum (``curriculum=difficulty``).

``Diffusion`` whose objective's time sampler is wrapped by ``gen.objectives.curriculum.DifficultyCurriculum``;
the stage advances from ``after_step`` on the step's mean loss (the same on every process) and is saved as the
method's extra state, so a resumed run continues exactly. Nothing else of ``Diffusion`` changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gen.objectives.base import Objective
from gen.objectives.curriculum import DifficultyCurriculum
from gen.train.diffusion import Diffusion
from gen.train.method import OptimizerFactory, Progress


class CurriculumDiffusion(Diffusion):
    """``Diffusion`` + the difficulty curriculum (see ``DifficultyCurriculum`` for the arguments)."""

    def __init__(
        self,
        net: Any,
        objective: Objective,
        optimizer: OptimizerFactory,
        image_resolution: int | None = None,
        clusters: int = 20,
        patience: int = 200,
        smoothing: float = 0.99,
    ) -> None:
        if getattr(objective, "prediction_spec", lambda: {})().get("prediction") == "consistency":
            raise ValueError("curriculum=difficulty works with flow matching and EDM objectives; objective=ict draws "
                             "its own discrete noise levels. Use curriculum=none")
        super().__init__(net, objective, optimizer, image_resolution)
        self.curriculum = DifficultyCurriculum(objective.time_sampler, clusters, patience, smoothing)
        objective.time_sampler = self.curriculum

    def after_step(self, progress: Progress, logged: Mapping[str, float]) -> None:
        self.curriculum.observe(float(logged["loss"]))

    def status(self, progress: Progress) -> dict[str, float]:
        # N + 1 once the curriculum is over (ordinary training).
        return {**super().status(progress), "curriculum_stage": float(self.curriculum.stage)}

    def extra_state(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "curriculum" in state:
            self.curriculum.load_state_dict(state["curriculum"])
