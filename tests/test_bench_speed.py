"""bench/yardstick_speed.py measures the training loop's own step: its stepper repeats ``train.py`` bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from yardstick_speed import Stepper, _rotations, compose_config  # noqa: E402


def test_stepper_repeats_the_training_loop(tmp_path: Path) -> None:
    """Three quick-start steps through the stepper give the weights and EMA that train.py's loop saves."""
    from hydra import compose, initialize_config_dir

    import train
    from gen.utils.ckpt import list_training_states, load_training_state

    overrides = [f"paths.runs={tmp_path}", "name=speed", "trainer.total_kimg=0.096", "trainer.lr_warmup_kimg=0",
                 "trainer.status_kimg=0.032", "trainer.tensorboard=false", "trainer.progress=false", "eval=none",
                 "preview.images=0", "model.depth=2"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        train.run(compose(config_name="train", overrides=overrides))
    state = load_training_state(list_training_states(tmp_path / "speed")[-1][1])["registry"]
    stepper = Stepper(compose_config(overrides), "eager")
    for _ in range(3):
        stepper.step()
    net = stepper.method.net.state_dict()
    assert state["module.net"].keys() == net.keys()
    assert all(torch.equal(state["module.net"][k], v) for k, v in net.items())
    ema = stepper.ema.state_dict()
    assert all(torch.equal(state["ema.net"][k], v) for k, v in ema.items())
    assert stepper.nimg == 96


def test_rounds_rotate_the_order() -> None:
    orders = list(_rotations(["a", "b", "c"], 4))
    # Rotated by one each round and reversed every other round, so no variant always follows the same one.
    assert orders == [["a", "b", "c"], ["a", "c", "b"], ["c", "a", "b"], ["c", "b", "a"]]
