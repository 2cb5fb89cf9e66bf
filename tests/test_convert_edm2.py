"""EDM2 network pickles (``scripts/convert.py --from edm2``, ``gen/models/convert_edm2.py``).

The test writes pickles in the structure of NVlabs/edm2's snapshots (``dnnlib.EasyDict(encoder, dataset_kwargs,
loss_fn, ema)``, each network a persistent object ``_reconstruct_persistent_obj(meta)`` with embedded source, its
``enc``/``dec`` plain ``torch.nn.ModuleDict``\\ s, fp16 tensors) with a fake ``torch_utils.persistence`` and
``dnnlib.util`` made here, not with the official code. The embedded source would create a marker file if it were
ever executed.
"""

from __future__ import annotations

import collections
import copyreg
import json
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from gen.models.convert_edm2 import EDM2PickleError, edm2_state, read_edm2_pickle
from gen.models.edm2 import EDM2UNet
from gen.utils.ckpt import file_sha256
from scripts import convert as cli
from tests.test_convert import _refused as refused  # one line, exit status 2, nothing written

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=16)


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """``torch_utils.persistence._reconstruct_persistent_obj`` and ``dnnlib.util.EasyDict`` under their real names,
    so that pickle writes the same globals as an official snapshot."""
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta: Any) -> Any:  # what the official function would do: exec the source
        raise AssertionError("never called while writing")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    for name, mod in (("torch_utils", types.ModuleType("torch_utils")), ("torch_utils.persistence", persistence),
                      ("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util)):
        monkeypatch.setitem(sys.modules, name, mod)
    yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


class Persistent:
    """Pickles as a persistent object: ``_reconstruct_persistent_obj(meta)`` with source code in ``meta``."""

    def __init__(self, fn: Any, class_name: str, state: dict[str, Any], source: str) -> None:
        self.fn, self.meta = fn, dict(type="class", version=6, module_src=source, class_name=class_name, state=state)

    def __reduce__(self) -> tuple:
        return (self.fn, (self.meta,))


class PlainModuleDict:
    """Pickles as ``torch.nn.ModuleDict`` (NEWOBJ, then BUILD with the module's ``__dict__``)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    @property
    def __class__(self) -> type:  # pickle checks that NEWOBJ's class is the object's
        return torch.nn.ModuleDict

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (copyreg.__newobj__, (torch.nn.ModuleDict,), self.state)


def module_state(params: dict, buffers: dict, modules: dict, kwargs: dict | None = None) -> dict[str, Any]:
    return {"training": False, "_parameters": collections.OrderedDict(params),
            "_buffers": collections.OrderedDict(buffers), "_non_persistent_buffers_set": set(),
            "_modules": collections.OrderedDict(modules), "_forward_hooks": collections.OrderedDict(),
            "_init_args": (), "_init_kwargs": kwargs or {}}


def as_records(module: torch.nn.Module, fn: Any, source: str) -> Any:
    """Our module tree as the official pickle holds it (fp16 tensors; ModuleDicts plain, the rest persistent)."""
    children = {n: as_records(c, fn, source) for n, c in module.named_children()}
    params = {n: torch.nn.Parameter(p.detach().half(), requires_grad=False) for n, p in module.named_parameters(recurse=False)}
    buffers = {n: b.half() for n, b in module.named_buffers(recurse=False)}
    state = module_state(params, buffers, children)
    if isinstance(module, torch.nn.ModuleDict):
        return PlainModuleDict(state)
    names = {"EDM2UNet": "UNet"}
    return Persistent(fn, names.get(type(module).__name__, type(module).__name__), state, source)


def write_pickle(path: Path, fake: types.SimpleNamespace, marker: Path, *, width: int = 32, channels: int = 3,
                 seed: int = 0, precond_kwargs: dict | None = None) -> tuple[Path, EDM2UNet]:
    """An EDM2 snapshot pickle of a tiny network with random weights and nonzero gains."""
    torch.manual_seed(seed)
    cfg = {**TINY, "model_channels": width}
    net = EDM2UNet(input_size=16, in_channels=channels, num_classes=10, **cfg)
    for p in net.parameters():
        if p.ndim == 0:
            p.data.fill_(0.8)
    source = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the embedded source ran')\n"
    logvar_f = Persistent(fake.reconstruct, "MPFourier",
                          module_state({}, {"freqs": torch.randn(128).half(), "phases": torch.rand(128).half()}, {}), source)
    logvar_l = Persistent(fake.reconstruct, "MPConv",
                          module_state({"weight": torch.nn.Parameter(torch.randn(1, 128).half(), False)}, {}, {}), source)
    kwargs = {"img_resolution": 16, "img_channels": channels, "label_dim": 10, "use_fp16": True, "dropout": 0.0, **cfg,
              **(precond_kwargs or {})}
    precond = Persistent(fake.reconstruct, "Precond", module_state(
        {}, {}, {"unet": as_records(net, fake.reconstruct, source), "logvar_fourier": logvar_f,
                 "logvar_linear": logvar_l}, kwargs), source)
    data = fake.EasyDict(encoder=Persistent(fake.reconstruct, "StandardRGBEncoder", module_state({}, {}, {}), source),
                         dataset_kwargs=fake.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip"),
                         loss_fn=Persistent(fake.reconstruct, "EDM2Loss", {"P_mean": -0.8, "P_std": 1.6}, source))
    data["ema"] = precond
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path, net


def convert(ckpt: Path, out: Path, *extra: str) -> int:
    return cli.main(["--from", "edm2", "--ckpt", str(ckpt), "--out", str(out), *extra])


def test_the_pickle_is_read_without_running_its_source(tmp_path: Path, fake_modules: types.SimpleNamespace) -> None:
    marker = tmp_path / "ran"
    ckpt, net = write_pickle(tmp_path / "edm2.pkl", fake_modules, marker)
    obj = read_edm2_pickle(ckpt)
    conv = edm2_state(obj, ckpt)
    assert not marker.exists()
    assert set(conv.tensors) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(conv.tensors[k], v.half()), k
    assert conv.model["model_channels"] == 32 and conv.model["input_size"] == 16 and conv.model["num_classes"] == 10
    assert any(d.startswith("logvar_linear.*") for d in conv.dropped)


def test_converted_snapshot_records_the_spec_and_samples_through_sample_py(
        tmp_path: Path, fake_modules: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    ckpt, net = write_pickle(tmp_path / "edm2-img64-tiny.pkl", fake_modules, marker)
    out = tmp_path / "snap.safetensors"
    assert convert(ckpt, out) == 0
    printed = capsys.readouterr().out
    assert "converted edm2-img64-tiny.pkl (edm2" in printed and "dropped: logvar_fourier.*" in printed
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["source"]["sha256"] == file_sha256(ckpt) and meta["source"]["from"] == "edm2"
    assert meta["prediction"] == {"path": {"_target_": "gen.paths.EDMPath", "sigma_max": 80.0}, "prediction": "x0",
                                  "precond": {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": 0.5}}
    assert meta["data"] == {"name": "imagenet64", "channels": 3, "resolution": 16, "num_classes": 10}
    assert meta["sampler"] == cli._yaml("sampler", "heun_edm2_img64")
    assert all(v.dtype == torch.float32 for v in tensors.values())
    # The snapshot's network is the written one (fp16-rounded weights), through the stored prediction spec.
    from gen.models.precond import EDMPrecond
    from gen.snapshot import load_network

    loaded, _ = load_network(out)
    ref = net.eval()
    ref.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    x, sigma, y = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 1.0, 40.0]), torch.tensor([1, 10, 4])
    torch.testing.assert_close(EDMPrecond(loaded)(x, sigma, y).out, EDMPrecond(ref)(x, sigma, y).out, rtol=0, atol=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={out}", "seeds=0-1", "sampler.steps=3"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arr = np.load(tmp_path / "samples" / "snap" / "samples.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3) and arr.std() > 0
    assert not marker.exists()


def test_refuses_a_pickle_that_would_run_code(tmp_path: Path, fake_modules: types.SimpleNamespace,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(fake_modules.EasyDict(ema=Payload())))
    out = tmp_path / "o.safetensors"
    refused(capsys, convert(evil, out), out, str(evil), "names posix.system", "refusing")
    assert not marker.exists()
    with pytest.raises(EDM2PickleError, match="builtins.eval"):
        (tmp_path / "eval.pkl").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
        read_edm2_pickle(tmp_path / "eval.pkl")


def test_refuses_truncated_and_missing_files(tmp_path: Path, fake_modules: types.SimpleNamespace,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, _ = write_pickle(tmp_path / "edm2.pkl", fake_modules, tmp_path / "ran")
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    out = tmp_path / "o.safetensors"
    refused(capsys, convert(cut, out), out, str(cut), "not a readable EDM2 network pickle", "download it again")
    refused(capsys, convert(tmp_path / "absent.pkl", out), out, "does not exist")
    other = tmp_path / "weights.pkl"
    other.write_bytes(pickle.dumps({"model": [1, 2, 3]}))
    refused(capsys, convert(other, out), out, "holds no EDM2 network under 'ema'")


def test_refuses_another_size_than_asked_and_latent_networks(tmp_path: Path, fake_modules: types.SimpleNamespace,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    xs, _ = write_pickle(tmp_path / "xs.pkl", fake_modules, tmp_path / "ran", width=128)  # EDM2-XS's width
    out = tmp_path / "o.safetensors"
    refused(capsys, convert(xs, out, "--size", "S"), out, "model_channels 128 (EDM2-XS)", "not EDM2-S's 192")
    refused(capsys, convert(xs, out, "--size", "huge"), out, "EDM2 sizes are XS, S, M, L, XL, XXL")
    assert convert(xs, out, "--size", "edm2-img64-xs") == 0
    out.unlink()
    latent, _ = write_pickle(tmp_path / "latent.pkl", fake_modules, tmp_path / "ran", channels=4)
    refused(capsys, convert(latent, out), out, "4-channel latent network (img512)")
    odd, _ = write_pickle(tmp_path / "odd.pkl", fake_modules, tmp_path / "ran", precond_kwargs={"mystery": 1})
    refused(capsys, convert(odd, out), out, "arguments ['mystery']")
