"""State dicts in other libraries' names, torch modules, and saved-file configs.

Three naming schemes map onto a module's parameters:

==================  =========================================  ===================
fastattn            torch.nn.MultiheadAttention                the seed's class
==================  =========================================  ===================
w_q, w_k, w_v       in_proj_weight (stacked) or q/k/v_proj_weight  query/key/value.weight
b_q, b_k, b_v       in_proj_bias (stacked)                     query/key/value.bias
w_o, b_o            out_proj.weight, out_proj.bias             fc.weight, fc.bias
==================  =========================================  ===================

torch is never imported here: tensors are recognised by their methods.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .functional import _shape_str, array_from

__all__ = ["to_numpy", "to_own_names", "torch_module_config", "read_module_file",
           "saved_name"]

_OWN = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")
_SEED = {
    "query.weight": "w_q", "key.weight": "w_k", "value.weight": "w_v", "fc.weight": "w_o",
    "query.bias": "b_q", "key.bias": "b_k", "value.bias": "b_v", "fc.bias": "b_o",
}
_TORCH_SPLIT = {
    "q_proj_weight": "w_q", "k_proj_weight": "w_k", "v_proj_weight": "w_v",
    "out_proj.weight": "w_o", "out_proj.bias": "b_o",
}
_TORCH_STACKED = {"in_proj_weight": "w", "in_proj_bias": "b"}


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A numpy array from an array-like or a (CPU or not) torch tensor."""
    if value is None:
        raise TypeError(f"{name}: expected a float array, got None")
    try:
        arr = array_from(value, name)
    except (ValueError, OverflowError) as exc:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
    return arr


def _shape(value: Any) -> tuple:
    return tuple(getattr(value, "shape", np.shape(value)))


def to_own_names(state: Mapping[str, Any], slices: Dict[str, slice], bias: bool,
                 embed_dim: int) -> Dict[str, Any]:
    """Rename ``state`` to w_q ... b_o, splitting torch's stacked in_proj tensors.

    Raises ValueError for unknown keys, keys missing for a complete module,
    and stacked tensors whose first axis is not D + 2*Dkv.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
    out: Dict[str, Any] = {}
    given_by: Dict[str, str] = {}
    unknown = []
    total = slices["v"].stop

    def put(name: str, value: Any, key: str) -> None:
        # two naming schemes for one parameter: which one was meant is unknowable
        if name in given_by:
            raise ValueError(f"state dict gives {name} twice: as {given_by[name]!r} and as "
                             f"{key!r}; keep one naming scheme")
        given_by[name] = key
        out[name] = value

    for key, value in state.items():
        if key in _OWN:
            put(key, value, key)
        elif key in _SEED:
            put(_SEED[key], value, key)
        elif key in _TORCH_SPLIT:
            put(_TORCH_SPLIT[key], value, key)
        elif key in _TORCH_STACKED:
            kind = _TORCH_STACKED[key]
            shape = _shape(value)
            expected = (total, embed_dim) if kind == "w" else (total,)
            if shape != expected:
                raise ValueError(
                    f"{key}: expected shape {expected} (q, k, v stacked), got {shape}"
                )
            arr = to_numpy(value, key)
            for part in ("q", "k", "v"):
                put(f"{kind}_{part}", arr[slices[part]], key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unexpected keys in state dict: {', '.join(sorted(map(repr, unknown)))}; expected fastattn names "
            f"{list(_OWN)}, torch.nn.MultiheadAttention names or the seed class's names"
        )
    needed = _OWN if bias else _OWN[:4]
    missing = [name for name in needed if name not in out]
    if missing:
        raise ValueError(f"missing parameters in state dict: {missing}")
    if not bias:
        extra = [name for name in _OWN[4:] if name in out and out[name] is not None]
        if extra:
            raise ValueError(f"state dict has biases {extra} but the module has bias=False")
    return out


def source_key(state: Mapping[str, Any], own_name: str) -> str:
    """The key of ``state`` that supplied ``own_name`` (for error messages)."""
    if own_name in state:
        return own_name
    for table in (_SEED, _TORCH_SPLIT):
        for key, name in table.items():
            if name == own_name and key in state:
                return key
    stacked = "in_proj_weight" if own_name.startswith("w") else "in_proj_bias"
    return f"{stacked} (part {own_name[-1]})" if stacked in state else own_name


def torch_module_config(module) -> tuple:
    """(config, state dict) of a torch.nn.MultiheadAttention or a seed-style module."""
    params = dict(module.state_dict()) if hasattr(module, "state_dict") else None
    if params is None:
        raise TypeError(f"from_torch expects a torch module, got {type(module).__name__}")
    if "in_proj_weight" in params or "q_proj_weight" in params:
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            raise ValueError(
                "from_torch: add_bias_kv and add_zero_attn of torch.nn.MultiheadAttention "
                "are not supported"
            )
        d_model = int(module.embed_dim)
        num_heads = int(module.num_heads)
        kdim = int(getattr(module, "kdim", d_model))
        vdim = int(getattr(module, "vdim", d_model))
        bias = "in_proj_bias" in params and params["in_proj_bias"] is not None
        weight = params.get("in_proj_weight", params.get("q_proj_weight"))
        if not bias:
            params = {k: v for k, v in params.items() if not k.endswith("bias")}
    elif all(f"{n}.weight" in params for n in ("query", "key", "value", "fc")):
        if not hasattr(module, "num_heads"):
            raise ValueError("from_torch: the module has query/key/value/fc but no num_heads")
        num_heads = int(module.num_heads)
        weight = params["query.weight"]
        d_model = int(weight.shape[1])
        kdim, vdim = int(params["key.weight"].shape[1]), int(params["value.weight"].shape[1])
        bias = "query.bias" in params
    else:
        raise TypeError(
            f"from_torch expects torch.nn.MultiheadAttention or a module with query, key, "
            f"value and fc linear layers, got {type(module).__name__}"
        )
    dtype = np.float64 if str(weight.dtype) == "torch.float64" else np.float32
    cfg = {"d_model": d_model, "num_heads": num_heads, "kdim": kdim, "vdim": vdim, "bias": bias,
           "dtype": dtype}
    return cfg, params


def parse_config(raw: Optional[np.ndarray], fmt: str, path) -> Dict[str, Any]:
    """The config stored by ``save``, checked field by field."""
    where = _source_name(path)
    if raw is None:
        raise ValueError(f"{where}: no __config__ entry; not written by fastattn's save()")
    try:
        cfg = json.loads(str(raw[()]))
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{where}: __config__ is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        found = cfg.get("format") if isinstance(cfg, dict) else None
        hint = ""
        if isinstance(found, str) and found.startswith("fastattn.") and "/" in found:
            hint = f" (it holds a {found.split('/')[0]}: load it with that class)"
        raise ValueError(f"{where}: __config__ format is {found!r}, not {fmt!r}{hint}")
    # bounded, so that no later size computation can overflow
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31  # noqa: E731
    checks = {
        "num_heads": positive,
        "num_kv_heads": positive,
        "bias": lambda v: isinstance(v, bool),
        "dtype": lambda v: v in ("float32", "float64"),
    }
    dims = ("d_model",) if "d_model" in cfg else ("embed_dim", "kdim", "vdim")
    checks.update({d: positive for d in dims})
    for key, ok in checks.items():
        if key not in cfg or not ok(cfg[key]):
            raise ValueError(f"{where}: __config__ field {key!r} is missing or invalid")
    return cfg


_CONFIG_MAX_BYTES = 1 << 16


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(shape, dtype) from an .npy member's header, reading no data."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), np.dtype(dtype)


def _member_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _source_name(path) -> str:
    """How messages name a file: its path, or a file object's name or type."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return os.fsdecode(path)
    return str(getattr(path, "name", None) or f"<{type(path).__name__}>")


def saved_name(path):
    """The file ``save(path)`` writes: numpy's savez adds ".npz" to a name
    without it.  Paths may be str, bytes or os.PathLike (bytes are decoded as
    the OS does, so b"m" and "m" name one file); file objects are returned
    as they came."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        if hasattr(path, "read") or hasattr(path, "write"):
            return path
        raise TypeError(f"path must be a file name (str, bytes or os.PathLike) or a binary "
                        f"file object, got {type(path).__name__}")
    name = os.fsdecode(path)
    return name if name.endswith(".npz") else name + ".npz"


def resolve_module_path(path):
    """The file ``load(path)`` reads: the one ``save(path)`` wrote.

    A name without ".npz" reads ``name.npz``; the name itself only when no
    ``name.npz`` exists (a file written through a file object, say).  When
    both exist, which one is meant is unknowable and ValueError names both.
    """
    saved = saved_name(path)
    if not isinstance(saved, str):
        return saved
    name = os.fsdecode(path)
    if saved == name:
        return name
    saved_exists, name_exists = os.path.exists(saved), os.path.exists(name)
    # a folder is never what save wrote, and one file under two names (a
    # symlink) is not two candidates
    if saved_exists and name_exists and os.path.isdir(saved) != os.path.isdir(name):
        return name if os.path.isdir(saved) else saved
    if saved_exists and name_exists and not os.path.samefile(saved, name):
        raise ValueError(
            f"path {name!r} is ambiguous: save({name!r}) writes {saved!r}, and a file "
            f"{name!r} exists too; pass the full name of the one to load"
        )
    if not saved_exists and not name_exists:
        raise FileNotFoundError(errno.ENOENT, f"no such file: {saved!r} (what save({name!r}) "
                                f"writes) nor {name!r}")
    return saved if saved_exists else name


def read_module_file(path, fmt: str,
                     expected_shapes: Callable[[Dict[str, Any]], Dict[str, Tuple[int, ...]]]):
    """(config, arrays) of a module file, checking everything before reading data.

    The archive's member names and each .npy header (shape and dtype) are
    checked against the config before any array is read, so a truncated,
    corrupted, pickled, oversized or mislabelled file is refused with a
    ValueError and nothing in it is executed or allocated.
    """
    path = resolve_module_path(path)
    where = _source_name(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # not a zip archive at all (an .npy, random bytes, ...)
        raise ValueError(f"{where}: not a fastattn .npz archive ({exc})") from None
    try:
        with zf:
            members: Dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"unexpected archive member {info.filename!r}")
                members[info.filename[:-4]] = info
            if "__config__" not in members:
                raise ValueError("no __config__ entry; not written by fastattn's save()")
            shape, dtype = _member_header(zf, members["__config__"])
            if shape != () or dtype.kind != "U" or dtype.itemsize > _CONFIG_MAX_BYTES:
                raise ValueError("__config__ is not a JSON string")
            cfg = parse_config(_member_array(zf, members["__config__"]), fmt, path)
            expected = expected_shapes(cfg)
            names = set(members) - {"__config__"}
            unexpected, missing = sorted(names - set(expected)), sorted(set(expected) - names)
            if unexpected or missing:
                raise ValueError(f"parameters do not match the config: unexpected {unexpected}, "
                                 f"missing {missing}")
            for name, want in expected.items():
                shape, dtype = _member_header(zf, members[name])
                if dtype.hasobject or dtype.kind != "f":
                    raise ValueError(f"{name}: expected a float array, got dtype {dtype}")
                if shape != tuple(want):
                    raise ValueError(f"{name}: expected shape {_shape_str(want)} from the config, "
                                     f"got {_shape_str(shape)}")
            arrays = {name: _member_array(zf, members[name]) for name in expected}
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # zipfile, zlib and header parsing fail in many ways
        raise ValueError(f"{where}: corrupted fastattn .npz archive "
                         f"({type(exc).__name__}: {exc})") from None
    return cfg, arrays
