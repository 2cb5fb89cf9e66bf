"""Run logging: an always-on JSONL stats file, optional TensorBoard, a fixed status line, a loss plot.

Library code never prints; the training loop hands status lines to ``print0``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class StatsLog:
    """Appends one JSON object per line to ``stats.jsonl`` and mirrors scalars to TensorBoard.

    Records are keyed by ``kimg`` (training images seen / 1000); ``step`` is logged too.
    On resume, records beyond the resumed image count are dropped first, so the file never holds
    two different histories for the same kimg.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_nimg: int | None = None) -> None:
        self.path = Path(run_dir) / "stats.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_nimg is not None:
            self._truncate_after(resume_nimg)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, nimg: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in read_stats(self.path) if r.get("nimg", 0) <= nimg]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append a record; numeric values also go to TensorBoard at x = nimg."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(record)) + "\n")
        except OSError as e:
            # A failed write on an open file (a full disk) names no file; name it (a torn line is skipped on reading).
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        if self.tb is not None:
            nimg = int(record.get("nimg", 0))
            for k, v in record.items():
                if k not in ("nimg", "kimg", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, global_step=nimg)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_stats(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``stats.jsonl``; a torn last line (process killed mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def status_line(record: Mapping[str, Any]) -> str:
    """Fixed-layout one-line summary: kimg, step, sec/kimg, loss terms, grad norm, lr, memory."""
    parts = [f"kimg {record['kimg']:9.1f}", f"step {record['step']:7d}"]
    if "sec_per_kimg" in record:
        parts.append(f"sec/kimg {record['sec_per_kimg']:7.2f}")
    for k, v in record.items():  # "loss", or "<phase>/loss" for methods with several optimizers
        if k.split("/")[-1] == "loss":
            parts.append(f"{k} {v:.4f}")
    for k, v in record.items():
        if k.split("/")[-1] == "grad_norm":
            parts.append(f"{k} {v:.3f}")
    method_numbers = (("curriculum_stage", "{:.0f}"), ("ict_levels", "{:.0f}"), ("ect_stage", "{:.0f}"))
    for k, fmt in (("skipped_steps", "{:.0f}"), *method_numbers, ("lr", "{:.2e}"), ("mem_gb", "{:.2f}")):
        if k in record:
            parts.append(f"{k} " + fmt.format(record[k]))
    return "  ".join(parts)


def plot_loss_curve(stats_path: str | os.PathLike, out_png: str | os.PathLike, key: str | None = None) -> Path | None:
    """Plot ``key`` (default: ``loss``, else the first ``<phase>/loss``) against kimg into a PNG (log-scale y)."""
    all_records = read_stats(stats_path)
    if key is None:
        keys = [k for r in all_records for k in r if k.split("/")[-1] == "loss"]
        key = "loss" if "loss" in keys or not keys else keys[0]
    records = [r for r in all_records if key in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["kimg"] for r in records]
    y = [r[key] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(x, y, lw=1.2)
    ax.set_xlabel("training images seen (kimg)")
    ax.set_ylabel(key)
    ax.set_yscale("log" if min(y) > 0 else "symlog")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{key} vs kimg")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".tmp-{out_png.name}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
