"""Training objectives: per-sample losses of one network on a batch (see ``gen.objectives.base``)."""

from __future__ import annotations

from gen.objectives.base import Objective
from gen.objectives.consistency import ImprovedConsistencyTraining
from gen.objectives.ect import EasyConsistencyTuning
from gen.objectives.edm import EDMLoss
from gen.objectives.flow_matching import FlowMatching

__all__ = ["EDMLoss", "EasyConsistencyTuning", "FlowMatching", "ImprovedConsistencyTraining", "Objective"]
