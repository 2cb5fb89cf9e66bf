"""SLAM's consistency level by level along the trajectory it distils (a diagnosis of the distill table's SLAM rows).

SLAM (``distill/slam.py``) trains ``f(x_{t_j}, t_j)`` to equal its EMA target at the next lower level along the
guided teacher's DDIM trajectory on the grid ``t_j = j t_max / N``. When it has converged, ``f`` maps every point of
that trajectory to the trajectory's end. This script draws ``--num`` noises and labels (seeded), runs the guided
teacher's DDIM steps down the whole grid (exactly SLAM's ``teacher_step``, one level at a time, so the trajectory is
the ODE the student learns), and reports, for each student snapshot of a run (and for the student at the start,
the teacher itself), the root-mean-square distance per pixel between ``f(x_{t_j}, t_j)`` (gamma = 1, as sampled)
and the end ``x_0``, averaged over bands of levels, together with the LCM sampler's levels. A consistency model
whose error stays flat from low to high levels has propagated the boundary condition up the grid; one whose error
grows with the level has not yet.

Example::

    python bench/slam_levels.py --run runs/yardstick/distill/slam-s0 \
        --teacher runs/yardstick/backbones/dit-s0/snapshot-000096000.safetensors
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.slam import guided_ddim_step  # noqa: E402
from distill.teacher import Teacher, load_teacher  # noqa: E402
from gen.models.student import lcm_boundary  # noqa: E402
from gen.paths import LinearPath  # noqa: E402
from gen.snapshot import load_network  # noqa: E402
from gen.utils.build import build  # noqa: E402
from gen.utils.cli import CommandError, run_main  # noqa: E402


def trajectory(teacher: str | Teacher, num: int, num_levels: int, t_max: float, guidance: float, seed: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The guided teacher's DDIM trajectory on SLAM's grid: (levels (N+1,), points (N+1, B, C, H, W), labels (B,)).

    ``points[j]`` is the trajectory at ``levels[j]``; ``points[0]`` its end. ``teacher``: its snapshot or loaded.
    """
    teacher = teacher if isinstance(teacher, Teacher) else load_teacher(teacher)
    levels = torch.linspace(0.0, t_max, num_levels + 1, dtype=torch.float64)
    res, ch = int(teacher.config["data"]["resolution"]), int(teacher.config["data"]["channels"])
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(num) % teacher.num_classes
    x = torch.randn(num, ch, res, res, generator=gen, dtype=torch.float64)
    x = LinearPath().sample(torch.zeros_like(x), x, levels[-1])  # the top level's marginal scale of pure noise
    points = [x]
    for j in range(num_levels, 0, -1):
        t_s, t_e = levels[j].expand(num), levels[j - 1].expand(num)
        x = guided_ddim_step(teacher, guidance, x, t_s, t_e, y)  # the method's own teacher step
        points.append(x)
    return levels, torch.stack(points[::-1]), y


ConsistencyFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.no_grad()
def level_errors(f: ConsistencyFn, levels: Tensor, points: Tensor, y: Tensor) -> Tensor:
    """RMS distance per pixel of ``f(x_{t_j}, t_j, y)`` from the trajectory's end, for j = 1..N: (N,)."""
    end = points[0].float()
    out = []
    for j in range(1, len(levels)):
        pred = f(points[j].float(), levels[j].expand(len(y)).float(), y).float()
        out.append((pred - end).square().mean().sqrt())
    return torch.stack(out)


def student(snapshot: Path) -> ConsistencyFn:
    """A SLAM student snapshot as its consistency function at gamma = 1 (as sampled)."""
    net, snap = load_network(snapshot)
    pc = dict((snap.config.get("prediction") or {}).get("precond") or {})
    if not str(pc.get("_target_", "")).endswith("SubpathConsistency"):
        raise CommandError(f"{snapshot} is not a SLAM student snapshot (its precond is {pc.get('_target_')!r})")
    f = build(pc, net=net).eval()  # the snapshot's own wrapper, as sampling builds it
    return lambda x, t, y: f(x, t, y).out


def student_at_start(teacher: str | Teacher, sigma_data: float, time_scale: float) -> ConsistencyFn:
    """The student before training: the teacher's weights with a zero gamma slot (``start_from_teacher``), i.e.
    the boundary scalings around the teacher's unguided clean-image estimate ``x - t v``."""
    teacher = teacher if isinstance(teacher, Teacher) else load_teacher(teacher)

    def f(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c_skip, c_out = lcm_boundary(t.double(), sigma_data, time_scale)
        b = (-1, 1, 1, 1)
        return c_skip.view(b) * x.double() + c_out.view(b) * teacher.denoise(x, t, y).double()
    return f


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a SLAM run folder (its snapshot-<nimg>.safetensors)")
    ap.add_argument("--teacher", required=True, help="the teacher snapshot the run distilled")
    ap.add_argument("--num", type=int, default=256, help="trajectories")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    snaps = sorted(p for p in args.run.glob("snapshot-*.safetensors") if re.fullmatch(r"snapshot-\d+", p.stem))
    if not snaps:
        raise CommandError(f"--run {args.run}: no snapshot-<nimg>.safetensors there; give a SLAM run folder")
    students = [(f"{int(p.stem.split('-')[1]) / 1000:g}k", student(p)) for p in snaps]
    import yaml

    method = yaml.safe_load((args.run / "config.yaml").read_text())["method"]
    n, t_max, w = int(method["num_levels"]), float(method["t_max"]), float(method["guidance"])
    teacher = load_teacher(args.teacher)
    levels, points, y = trajectory(teacher, args.num, n, t_max, w, args.seed)
    students.insert(0, ("0k (start)", student_at_start(teacher, float(method.get("sigma_data", 0.5)),
                                                       float(method.get("time_scale", 10_000.0)))))
    bands = [(1, 5), (6, 12), (13, 13), (14, 24), (25, 25), (26, 37), (38, 38), (39, 49), (50, 50)]
    print(f"RMS per pixel of f(x_t_j, t_j) - x_0 along the guided teacher's DDIM trajectory ({args.num} images, "
          f"{n} levels, w = {w:g}); single levels are the LCM sampler's")
    print("| student | " + " | ".join(f"j {a}" if a == b else f"j {a}-{b}" for a, b in bands) + " |")
    print("|---|" + "---|" * len(bands))
    for name, f in students:
        err = level_errors(f, levels, points, y)
        print(f"| {name} | " + " | ".join(f"{err[a - 1:b].mean():.3f}" for a, b in bands) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "slam_levels.py"))
