"""Frozen teachers: a trained snapshot with its own prediction spec, tokenizer and sampler, never optimised.

A distillation method holds its teacher with ``gen.utils.frozen.hold_frozen`` (outside ``parameters()``,
``state_dict()``, the optimizers, DDP, training states and snapshots; its class and weights hash are checked on
resume by the loop), and refers to it in its student snapshots by path and file SHA-256. The student starts from
the teacher's weights through ``trainer.init={net: <teacher snapshot>}``.

What a teacher can do, each in its own time convention (``gen.paths``: data at t=0):

* ``velocity(x, t, y)``: the ODE velocity of its prediction spec (``gen.models.prediction.velocity_model``);
* ``denoise(x, t, y)``: its clean-image estimate at (x, t);
* ``sample(noise, y)``: an ODE sample from unit noise with its own sampler (the training run's, or one given),
  with network calls padded to a fixed number of rows so that a sample depends only on its own noise and label.

:func:`check_teacher` holds the refusals every method shares (one line each): another data set, resolution or channel
count than the run's, and a prediction kind the method cannot use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gen.models.prediction import prediction_path, velocity_model
from gen.models.rows import MinRows
from gen.paths import Path
from gen.snapshot import LoadedSnapshot, load_network, read_snapshot
from gen.utils.ckpt import CheckpointError
from gen.utils.config import ConfigError
from samplers.spec import DEFAULT_SAMPLER, SamplerSpec, check_sampler, guided_model_fn, run_sampler

__all__ = ["Teacher", "TeacherError", "load_teacher", "open_teacher", "check_teacher", "check_same_teacher",
           "check_student_sampler", "prediction_kind", "PREDICTION_KINDS"]

# prediction kind -> (prediction, path target) as snapshots store them (``Objective.prediction_spec``).
PREDICTION_KINDS: dict[str, tuple[str, str]] = {
    "flow": ("velocity", "gen.paths.LinearPath"),
    "edm": ("x0", "gen.paths.EDMPath"),
}


# Students whose snapshots may teach (``distill.method`` of their metadata): reflow's, a rectified flow again.
STUDENTS_AS_TEACHERS = ("reflow",)


class TeacherError(ValueError):
    """A teacher snapshot that the method cannot use; the message names the file and the fix (one line)."""


def prediction_kind(prediction: Mapping[str, Any]) -> str | None:
    """``"flow"`` / ``"edm"`` for the prediction specs of :data:`PREDICTION_KINDS`, else None (e.g. consistency)."""
    got = (prediction.get("prediction"), (prediction.get("path") or {}).get("_target_"))
    return next((k for k, v in PREDICTION_KINDS.items() if v == got), None)


def check_not_student(config: Mapping[str, Any], source: str, method: str) -> None:
    """Refuse a few-step student's snapshot as a teacher (a reflow student is accepted: k-reflow distils it again).

    The other students' networks are trained for their few-step samplers, so their velocity at other times is no ODE
    to distil. A TDM student passes the prediction-kind check (velocity on the linear path), hence this one.

    Raises:
        TeacherError: naming the file, its method and its own teacher.
    """
    student = config.get("distill")
    if isinstance(student, Mapping) and student.get("method") not in STUDENTS_AS_TEACHERS:
        made_from = (student.get("teacher") or {}).get("path")
        raise TeacherError(f"{method}: teacher {source} is a {student.get('method')} student"
                           + (f" (distilled from {made_from})" if made_from else "")
                           + ": its network is trained for its few-step sampler, not as an ODE teacher; give its teacher"
                           " or another diffusion or flow snapshot")


def check_teacher(config: Mapping[str, Any], source: str, *, data_name: str | None, resolution: int | None,
                  channels: int | None, kinds: Sequence[str], method: str) -> str:
    """Refuse a teacher snapshot of another data set or image size, or of a prediction kind ``method`` cannot use.

    Args:
        config: the snapshot's metadata (``data``, ``prediction``).
        source: the file, for the message.
        data_name / resolution / channels: the run's ``data.*`` (None: not checked).
        kinds: the kinds of :data:`PREDICTION_KINDS` the method accepts.
        method: the method's name, for the message.

    Returns:
        The teacher's prediction kind.

    Raises:
        TeacherError: one line naming the file, what differs and the fix.
    """
    check_not_student(config, source, method)
    data = config.get("data") or {}
    for key, want in (("name", data_name), ("resolution", resolution), ("channels", channels)):
        if want is not None and data.get(key) != want:
            raise TeacherError(f"{method}: teacher {source} was trained on data {key}={data.get(key)!r}, not the run's "
                               f"data.{key}={want!r}; distill on the teacher's own data (data=...) or give its teacher")
    pred = config.get("prediction") or {}
    kind = prediction_kind(pred)
    if kind not in kinds:
        got = f"{pred.get('prediction')} on {(pred.get('path') or {}).get('_target_')}"
        raise TeacherError(f"{method}: teacher {source} is a {got} model; this method needs a "
                           f"{' or '.join(f'{PREDICTION_KINDS[k][0]} model on {PREDICTION_KINDS[k][1]}' for k in kinds)}"
                           " (a flow-matching or EDM snapshot trained by train.py)")
    return kind


@dataclass
class Teacher:
    """A frozen teacher (module docstring).

    Attributes:
        net: the frozen backbone (eval mode, ``requires_grad=False``).
        prediction: its prediction spec (path, prediction kind, preconditioning).
        config: the snapshot's whole metadata (``data``, ``tokenizer``, ``sampler``, ...).
        source: the snapshot file.
        sha256: the file's SHA-256 (the identity students and pairs record).
        sampler: the sampler it samples with (its run's, unless one was given).
        min_rows: network calls are padded to at least this many rows (batch-size invariance, ``MinRows``).
    """

    net: nn.Module
    prediction: dict[str, Any]
    config: dict[str, Any]
    source: str
    sha256: str
    sampler: SamplerSpec
    min_rows: int = 16
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.path = prediction_path(self.prediction)

    @property
    def num_classes(self) -> int:
        return int(self.config["data"]["num_classes"])

    @property
    def kind(self) -> str | None:
        return prediction_kind(self.prediction)

    def identity(self) -> dict[str, str]:
        """``{"path", "sha256"}``: how snapshots and pair manifests refer to the teacher."""
        return {"path": self.source, "sha256": self.sha256}

    def velocity_fn(self, pad: bool = True) -> Callable[..., Tensor]:
        """``model_fn(x, t, y) -> velocity`` in the teacher's path time (padded calls with ``pad``)."""
        net: nn.Module = MinRows(self.net, self.min_rows) if pad and self.min_rows > 1 else self.net
        return velocity_model(net, self.prediction)

    @torch.no_grad()
    def denoise(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """Clean-image estimate ``x0(x_t, t)`` (B, C, H, W) from the velocity, in the teacher's path time ``t`` (B,)."""
        v = self.velocity_fn(pad=False)(x, t, y).float()
        return self.path.x0_eps_from_velocity(x.float(), v, t)[0].float()

    @torch.no_grad()
    def sample(self, noise: Tensor, y: Tensor, randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> Tensor:
        """The teacher's sample (model space, float32, (B, C, H, W)) from unit ``noise`` with its sampler and guidance.

        The sampler starts at ``sigma(t_max) * noise`` (``samplers``), so on the flow path ``noise`` is the ODE's
        starting point itself; ``randn_like`` serves stochastic samplers (per-image generators).
        """
        model_fn = guided_model_fn(self.velocity_fn(), self.sampler, self.num_classes)
        return run_sampler(model_fn, noise, y, self.path, self.sampler, randn_like).float()


def open_teacher(source: str | os.PathLike) -> LoadedSnapshot:
    """Read a teacher snapshot (tensors and metadata, weights checked finite) without building its network.

    Raises:
        FileNotFoundError: the file is missing. CheckpointError: not a train.py snapshot. NonFiniteError: NaN/inf.
    """
    if str(source) in ("???", "", "None"):
        raise FileNotFoundError("method.teacher is not set; give method.teacher=<teacher snapshot.safetensors>")
    if not os.path.exists(source):  # a folder goes on to the loader, which says what to give instead
        raise FileNotFoundError(f"teacher snapshot {source} does not exist; give the teacher's snapshot file "
                                "(runs/<name>/snapshot-*.safetensors)")
    return read_snapshot(source, need=("model", "prediction", "data"))


def load_teacher(source: str | os.PathLike, sampler: Mapping[str, Any] | None = None,
                 device: torch.device | str = "cpu") -> Teacher:
    """Load a teacher snapshot: the network (frozen), its prediction spec and metadata, and its sampler.

    Args:
        source: the snapshot file.
        sampler: a sampler config (``configs/sampler``) to sample with instead of the one its run stored.
        device: where the network goes.

    Raises:
        FileNotFoundError: the file is missing (naming it). CheckpointError: not a train.py snapshot.
        NonFiniteError: NaN/inf weights. TeacherError: a sampler that cannot serve it.
    """
    snap = open_teacher(source)
    net, _ = load_network(snap, device)
    spec_cfg = dict(sampler or snap.config.get("sampler") or DEFAULT_SAMPLER)
    try:
        spec = SamplerSpec.from_config(spec_cfg)
        check_sampler(spec, snap.config["prediction"], int(snap.config["data"]["num_classes"]))
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherError(f"teacher {source}: its sampler cannot serve it: {e}") from e
    if not isinstance(snap.config["prediction"], Mapping):
        raise CheckpointError(f"teacher {source}: its prediction metadata is not a mapping")
    return Teacher(net, dict(snap.config["prediction"]), dict(snap.config), str(source), snap.sha256, spec)


def check_same_teacher(saved: Mapping[str, Any] | None, current: Mapping[str, str]) -> None:
    """Refuse to resume a student run with another teacher file (by SHA-256) than the one it started with."""
    if saved is not None and saved.get("sha256") != current["sha256"]:
        raise ConfigError(f"this run was trained with teacher {saved.get('path')} (sha256 {str(saved.get('sha256'))[:12]}), "
                          f"but method.teacher={current['path']} is another file ({current['sha256'][:12]}); restore "
                          "the teacher or start a new run (name=...)")


def check_student_sampler(sampler: Mapping[str, Any], solvers: Sequence[str], method: str, preset: str) -> None:
    """Refuse a sampler whose solver the student cannot serve (one line naming the solver and the choices)."""
    name = (sampler.get("solver") or {}).get("_target_")
    if name not in solvers:
        raise ValueError(f"sampler.solver={name} cannot serve a {method} student; use one of {list(solvers)} "
                         f"(e.g. sampler={preset})")
    if float((sampler.get("solver") or {}).get("s_churn", 0.0) or 0.0) > 0:
        raise ValueError(f"sampler.solver.s_churn>0 makes the sampler stochastic, which a {method} student's "
                         "deterministic coupling cannot serve; set s_churn=0")


def start_from_teacher(module: nn.Module, teacher_net: nn.Module, what: str) -> None:
    """Copy the teacher's weights into a student or fake-score network of the teacher's architecture.

    The module may carry one thing the teacher lacks: the extra-condition slot (``aug_embedder``, zero-initialised,
    so the copy computes exactly the teacher's function), through which a TDM-unify or SLAM student takes its K or
    gamma. Every other name and shape must be the teacher's.

    Raises:
        TeacherError: one line naming ``what`` (the config key), what differs and the fix.
    """
    own, theirs = module.state_dict(), teacher_net.state_dict()
    extra = sorted(k for k in own if k not in theirs and not k.startswith("aug_embedder."))
    missing = sorted(k for k in theirs if k not in own)
    shapes = sorted(k for k in theirs if k in own and own[k].shape != theirs[k].shape)
    if extra or missing or shapes:
        detail = (f"{shapes[0]} is {tuple(own[shapes[0]].shape)}, the teacher's {tuple(theirs[shapes[0]].shape)}"
                  if shapes else f"names {'only it has' if extra else 'it lacks'}: {(extra or missing)[:3]}")
        raise TeacherError(f"{what} is another network than the teacher ({type(module).__name__}; {detail}); it starts "
                           "from the teacher's weights, so build it with the teacher's model config (its snapshot's "
                           "'model' section; only augment_dim may differ)")
    with torch.no_grad():
        for k, v in theirs.items():
            own[k].copy_(v)
