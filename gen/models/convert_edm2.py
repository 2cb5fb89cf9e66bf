"""EDM2's published network pickles (NVlabs/edm2, e.g. ``edm2-img64-s-1073741-0.075.pkl``) to ``EDM2UNet`` weights.

The official files are Python pickles of ``dnnlib.EasyDict(encoder, dataset_kwargs, loss_fn, ema)`` whose modules
are persistent classes (NVlabs/edm2 ``torch_utils/persistence.py``): each pickles as a call of
``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name, state}``, and the
standard unpickler would ``exec`` the embedded ``module_src``. :func:`read_edm2_pickle` never does: a restricted
``pickle.Unpickler`` resolves only

* ``collections.OrderedDict``, and ``dnnlib.util.EasyDict`` as a plain ``dict``;
* ``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter`` (``_with_state``) as tensor rebuilds;
* ``torch.storage._load_from_bytes``, whose bytes (one storage in ``torch.save``'s format) are read with
  ``torch.load(..., weights_only=True)``;
* ``torch_utils.persistence._reconstruct_persistent_obj``, replaced by a function that returns the metadata
  (:class:`PersistentRecord`: class name, init arguments, state) and drops the source unread;
* ``torch.nn.modules.container.ModuleDict`` / ``ModuleList`` / ``Sequential``, as inert :class:`ModuleRecord`\\ s;

and refuses every other global with an error naming the file. :func:`edm2_state` then flattens the ``ema``
network's records into a state dict, maps the official ``Precond`` arguments onto ``EDM2UNet``'s and drops the
uncertainty head (``logvar_fourier``, ``logvar_linear``; EDM2 Eq. 21), which no objective here uses.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Published EDM2 widths (NVlabs/edm2 train_edm2.py presets: channels per size).
EDM2_SIZES: dict[str, int] = {"XS": 128, "S": 192, "M": 256, "L": 320, "XL": 384, "XXL": 448}
# Precond's own arguments and their positions (NVlabs/edm2 training/networks_edm2.py ``Precond.__init__``).
PRECOND_ARGS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
# Official UNet / Block argument -> EDM2UNet argument (the same name unless listed).
RENAMED = {"img_resolution": "input_size", "img_channels": "in_channels", "label_dim": "num_classes"}
UNET_ARGS = ("model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
             "attn_resolutions", "label_balance", "concat_balance", "dropout_res", "resample_filter",
             "channels_per_head", "dropout", "res_balance", "attn_balance", "clip_act")
DROPPED_PREFIXES = ("logvar_fourier.", "logvar_linear.")


class EDM2PickleError(ValueError):
    """An EDM2 pickle that cannot be read safely or is not the expected network; the message names the file."""


@dataclass
class PersistentRecord:
    """What a persistent object's pickle holds, without its code: ``class_name`` and ``state`` (the module's
    ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs``, ...)."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple[Any, ...]:
        return tuple(self.state.get("_init_args") or ())


class ModuleRecord:
    """An inert stand-in for a torch container module (``ModuleDict`` ...): ``NEWOBJ`` makes it, ``BUILD`` gives it
    the module's ``__dict__`` as ``state``; no torch code runs."""

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, Mapping) else {}


class _PlainDict(dict):
    """``dnnlib.util.EasyDict`` read as a plain dict (its attribute access is not needed)."""


def _record_persistent(meta: Any) -> PersistentRecord:
    if not isinstance(meta, Mapping) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("a persistent object without the expected metadata")
    state = meta.get("state")
    return PersistentRecord(meta["class_name"], dict(state) if isinstance(state, Mapping) else {})


def _storage_from_bytes(data: bytes) -> Any:
    # One storage in torch.save's format (torch.storage._load_from_bytes): read with the weights-only unpickler.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _parameter(data: Tensor, requires_grad: bool = False, backward_hooks: Any = None, *state: Any) -> Tensor:
    return data.detach()


def _tensor(storage: Any, offset: int, size: Any, stride: Any, requires_grad: bool = False,
            backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    # torch._utils._rebuild_tensor_v2 without hooks or metadata (which could name callables).
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor over a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_persistent,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch.nn.modules.container", "ModuleList"): ModuleRecord,
    ("torch.nn.modules.container", "Sequential"): ModuleRecord,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise EDM2PickleError(
                f"{self.path} names {module}.{name}, which an EDM2 network pickle does not need; refusing to load it "
                "(no code from the file was run). Give the official edm2-*.pkl file"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise EDM2PickleError(f"{self.path} uses persistent ids (a torch.save file?); it is not an EDM2 network pickle")


def read_edm2_pickle(path: str | Path) -> Any:
    """The object in an EDM2 pickle, built only from dicts, lists, tensors and records (module docstring).

    Raises:
        EDM2PickleError: a missing, truncated or foreign file, or one that names anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise EDM2PickleError(f"checkpoint {path} does not exist; give the downloaded edm2-*.pkl file")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        except EDM2PickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RuntimeError) as e:
            what = "it ends early (truncated)" if isinstance(e, EOFError) else str(e).splitlines()[0][:160] if str(e) \
                else type(e).__name__
            raise EDM2PickleError(f"{path} is not a readable EDM2 network pickle ({what}); download it again") from e


def _record_state(rec: PersistentRecord | ModuleRecord) -> dict[str, Any]:
    return rec.state


def flatten_module(rec: PersistentRecord | ModuleRecord, path: str, prefix: str = "") -> dict[str, Tensor]:
    """The state dict of a module record: its parameters and persistent buffers, then its children's, prefixed."""
    state = _record_state(rec)
    out: dict[str, Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(value, Tensor):
                raise EDM2PickleError(f"{path}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleRecord)):
            raise EDM2PickleError(f"{path}: module {prefix}{name} is a {type(child).__name__}, not a network module")
        out.update(flatten_module(child, path, f"{prefix}{name}."))
    return out


def _size_name(channels: int) -> str | None:
    return next((k for k, v in EDM2_SIZES.items() if v == channels), None)


def _normalise_size(size: str) -> str:
    """``"S"``, ``"s"``, ``"EDM2-S"`` or ``"edm2-img64-s"`` -> ``"S"``."""
    return size.strip().upper().replace("EDM2-IMG64-", "").replace("EDM2-IMG512-", "").replace("EDM2-", "")


@dataclass
class EDM2Converted:
    """``tensors`` for ``EDM2UNet(**model)`` (``model`` holds ``_target_``), the preset name, dropped parts,
    the checks made, and ``sigma_data`` of the official preconditioning."""

    tensors: dict[str, Tensor]
    model: dict[str, Any]
    preset: str
    dropped: list[str]
    checked: list[str]
    sigma_data: float


def edm2_state(obj: Any, path: str | Path, expect_size: str | None = None) -> EDM2Converted:
    """Map the ``ema`` network of a read EDM2 pickle onto ``EDM2UNet`` (module docstring).

    Args:
        obj: what :func:`read_edm2_pickle` returned.
        path: the file, for messages.
        expect_size: refuse a network of another width (``"S"``, ``"edm2-img64-s"``, ...).

    Raises:
        EDM2PickleError: not an EDM2 ``Precond``, a latent (img512) network, unknown arguments or another size.
    """
    path = str(path)
    net = obj.get("ema") if isinstance(obj, Mapping) else None
    if not isinstance(net, PersistentRecord):
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise EDM2PickleError(f"{path} holds no EDM2 network under 'ema' (found {keys}); give an edm2-*.pkl network file")
    if net.class_name != "Precond":
        raise EDM2PickleError(f"{path}: its 'ema' network is a {net.class_name}, not EDM2's Precond "
                              "(training/networks_edm2.py)")
    kwargs = dict(zip(PRECOND_ARGS, net.init_args))
    kwargs.update(net.init_kwargs)
    kwargs.pop("class_name", None)
    unknown = sorted(set(kwargs) - set(PRECOND_ARGS) - set(UNET_ARGS))
    if unknown:
        raise EDM2PickleError(f"{path}: Precond was built with arguments {unknown} that EDM2UNet does not have; it is "
                              "not a published EDM2 network")
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
    if missing:
        raise EDM2PickleError(f"{path}: Precond's recorded arguments lack {missing}; cannot tell the network's shape")
    if int(kwargs["img_channels"]) != 3:
        raise EDM2PickleError(f"{path}: a {kwargs['img_channels']}-channel latent network (img512); only the pixel "
                              "ImageNet-64 networks (edm2-img64-*) convert, EDM2's latent encoder is not a tokenizer here")
    model: dict[str, Any] = {"_target_": "gen.models.edm2.EDM2UNet"}
    for key, value in kwargs.items():
        if key in RENAMED:
            model[RENAMED[key]] = int(value)
        elif key in UNET_ARGS:
            model[key] = list(value) if isinstance(value, (list, tuple)) else value
    from gen.models.edm2 import EDM2UNet  # the defaults of the official UNet/Block are EDM2UNet's own

    with torch.device("meta"):
        skeleton = EDM2UNet(**{k: v for k, v in model.items() if k != "_target_"})
    model = {"_target_": model["_target_"], **skeleton.config}
    width = int(model["model_channels"])
    name = _size_name(width)
    preset = f"EDM2-{name}" if name else f"EDM2 (model_channels {width})"
    if expect_size is not None:
        want = _normalise_size(expect_size)
        if want not in EDM2_SIZES:
            raise EDM2PickleError(f"--size {expect_size}: EDM2 sizes are {', '.join(EDM2_SIZES)}")
        if want != name:
            raise EDM2PickleError(f"{path} has model_channels {width} ({preset if name else 'no published size'}), "
                                  f"not EDM2-{want}'s {EDM2_SIZES[want]} as asked by --size")
    flat = flatten_module(net, path)
    dropped = sorted({k.split(".")[0] + ".*" for k in flat if k.startswith(DROPPED_PREFIXES)})
    tensors = {k[len("unet."):]: v for k, v in flat.items() if k.startswith("unet.")}
    other = sorted(k for k in flat if not k.startswith("unet.") and not k.startswith(DROPPED_PREFIXES))
    if other:
        raise EDM2PickleError(f"{path}: Precond holds tensors {other[:4]} outside unet.* and the uncertainty head")
    from gen.utils.ckpt import load_state_dict_checked

    try:
        load_state_dict_checked(skeleton, {k: v.to("meta") for k, v in tensors.items()}, path, assign=True)
    except ValueError as e:
        raise EDM2PickleError(f"{path}: the network's tensors do not fit EDM2UNet({preset}):\n{e}") from e
    dropped = [f"{d} (EDM2's uncertainty head u(sigma), unused here)" for d in dropped]
    checked = [f"Precond arguments -> EDM2UNet({', '.join(f'{k}={model[k]}' for k in ('input_size', 'num_classes', 'model_channels', 'dropout'))})",
               "unet.* -> the same names (every tensor checked against EDM2UNet's shapes)"]
    others = sorted(k for k in obj if k != "ema") if isinstance(obj, Mapping) else []
    if others:
        dropped.append(f"{', '.join(others)} (training-time entries of the pickle, read as records and not used)")
    return EDM2Converted(tensors, model, preset, dropped, checked, float(kwargs.get("sigma_data", 0.5)))
