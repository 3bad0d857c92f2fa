"""Persistence: a module's ``.npz`` files, its state dict, and pickling.

A file holds the config (as JSON, under ``__config__``) and one array per
parameter under this library's names (w_q ... b_o).  Reading checks the
archive's member names and each .npy header against the config before any
array is read: no pickle is ever loaded and nothing is allocated from what a
file claims.  A pickle is the config and the state dict, never compiled state.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from . import interop
from ._params import param_shapes
from ._dtypes import BFLOAT16, kernel_view
from ._validate import module_config, shape_str

__all__ = ["Persistence", "read_module_file", "saved_name", "resolve_module_path"]


# The first constructor argument's names: what config() writes, and the
# spelling files and pickles from before embed_dim was the first argument's
# name in both classes hold (the self-attention class's "d_model").
DIM_ALIASES = ("embed_dim", "d_model")


def parse_config(raw: Optional[np.ndarray], fmt: str, path,
                 dims: Tuple[str, ...] = ("embed_dim",)) -> Dict[str, Any]:
    """The config stored by ``save``, checked field by field; ``dims`` are the
    width fields the class needs (``embed_dim`` may be spelled ``d_model``)."""
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
            holds = found.split("/")[0]
            if holds != fmt.split("/")[0]:
                hint = f" (it holds a {holds}: load it with that class)"
            else:
                # the same class in another file version: another fastattn wrote it
                hint = (f" (a {holds} in another file version than this fastattn's "
                        f"{fmt.split('/')[1]})")
        raise ValueError(f"{where}: __config__ format is {found!r}, not {fmt!r}{hint}")
    spelled = [name for name in DIM_ALIASES if name in cfg]
    if len(spelled) > 1:
        raise ValueError(f"{where}: __config__ gives both {DIM_ALIASES[0]!r} and "
                         f"{DIM_ALIASES[1]!r}; keep one")
    first = spelled[0] if spelled else DIM_ALIASES[0]
    # bounded, so that no later size computation can overflow
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31  # noqa: E731
    checks = {
        "num_heads": positive,
        "num_kv_heads": positive,
        "bias": lambda v: isinstance(v, bool),
        "dtype": lambda v: v in ("float32", "float64", "bfloat16", "float16"),
    }
    if cfg.get("precision") not in (None, "bfloat16", "float16"):
        raise ValueError(f"{where}: __config__ field 'precision' is invalid")
    checks.update({(first if d == DIM_ALIASES[0] else d): positive for d in dims})
    for key, ok in checks.items():
        if key not in cfg or not ok(cfg[key]):
            raise ValueError(f"{where}: __config__ field {key!r} is missing or invalid")
    # the decoder settings, where given (their values are the constructor's to check)
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    side = lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))  # noqa: E731
    optional = {
        "head_dim": positive,
        "sinks": lambda v: isinstance(v, bool),
        "scale": real,
        "softcap": real,
        "window": lambda v: isinstance(v, list) and len(v) == 2 and all(map(side, v)),
        "rotary": lambda v: isinstance(v, dict),
    }
    for key, ok in optional.items():
        if key in cfg and cfg[key] is not None and not ok(cfg[key]):
            raise ValueError(f"{where}: __config__ field {key!r} is invalid")
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


def read_module_file(path, fmt: str, dims: Tuple[str, ...],
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
                if info.filename[:-4] in members:
                    # (an archive appended to): which copy is meant is unknowable
                    raise ValueError(f"archive member {info.filename!r} appears twice")
                members[info.filename[:-4]] = info
            if "__config__" not in members:
                raise ValueError("no __config__ entry; not written by fastattn's save()")
            shape, dtype = _member_header(zf, members["__config__"])
            if shape != () or dtype.kind != "U" or dtype.itemsize > _CONFIG_MAX_BYTES:
                raise ValueError("__config__ is not a JSON string")
            cfg = parse_config(_member_array(zf, members["__config__"]), fmt, path, dims)
            expected = expected_shapes(cfg)
            names = set(members) - {"__config__"}
            unexpected, missing = sorted(names - set(expected)), sorted(set(expected) - names)
            if unexpected or missing:
                raise ValueError(f"parameters do not match the config: unexpected {unexpected}, "
                                 f"missing {missing}")
            for name, want in expected.items():
                shape, dtype = _member_header(zf, members[name])
                # bfloat16 is stored as its 16-bit words (.npy has no such type)
                words = cfg["dtype"] == "bfloat16" and dtype == np.uint16
                if dtype.hasobject or (dtype.kind != "f" and not words):
                    raise ValueError(f"{name}: expected a float array, got dtype {dtype}")
                if shape != tuple(want):
                    raise ValueError(f"{name}: expected shape {shape_str(want)} from the config, "
                                     f"got {shape_str(shape)}")
            arrays = {name: _member_array(zf, members[name]) for name in expected}
            if cfg["dtype"] == "bfloat16":
                arrays = {name: a.view(BFLOAT16) if a.dtype == np.uint16 else a
                          for name, a in arrays.items()}
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


class Persistence:
    """The persistence half of a module: state dicts, files, pickles,
    equality.  Each class sets ``_FORMAT`` (its files' format name) and
    ``_DIMS`` (its width fields)."""

    _FORMAT = ""
    _DIMS: Tuple[str, ...] = ("embed_dim",)

    @classmethod
    def _normalise_config(cls, cfg: Mapping[str, Any]) -> Dict[str, Any]:
        """A config (config(), a file's, an old pickle's) checked, with
        defaults filled in; its first width may be spelled ``d_model``."""
        name = DIM_ALIASES[1] if DIM_ALIASES[1] in cfg else DIM_ALIASES[0]
        cross = "kdim" in cls._DIMS
        out = module_config(cfg[name], cfg["num_heads"], cfg["num_kv_heads"],
                            cfg["kdim"] if cross else None, cfg["vdim"] if cross else None,
                            cfg["bias"], cfg["dtype"], name, cfg.get("precision"),
                            cfg.get("head_dim"), cfg.get("sinks", False))
        # the decoder settings, checked by the constructor they go to
        for key in ("rotary", "scale", "softcap", "window"):
            if cfg.get(key) is not None:
                out[key] = tuple(cfg[key]) if key == "window" else cfg[key]
        return out

    @classmethod
    def _param_shapes(cls, cfg: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """Parameter shapes a config implies (validating it, allocating nothing)."""
        return param_shapes(cls._normalise_config(cfg))

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters under this class's names (w_q, ..., b_o)."""
        state = self._state  # one moment's weights, whatever other threads assign
        return {name: self._param_view(name, state).copy() for name in self._shapes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load parameters from a dict of numpy arrays or torch tensors.

        Accepts this class's names (``w_q`` ...), those of
        ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
        ``out_proj.weight``, ``out_proj.bias``, or ``q_proj_weight`` ...) and
        those of a PyTorch module with ``query``, ``key``, ``value`` and ``fc``
        linears (``query.weight`` ... ``fc.bias``).

        Raises
        ------
        ValueError
            Unknown or missing keys, or a shape that does not fit (the message
            names the key and both shapes).  A failed load changes nothing.
        """
        params = interop.to_own_names(state, self._slices(), self.bias, self.embed_dim,
                                      self.has_sinks)
        staged = {}
        for name, value in params.items():
            if name not in self._shapes:
                raise ValueError(f"{name}: this module was built with bias=False")
            staged[name] = self._staged_param(name, value, interop.source_key(state, name))
        self._store_params(staged)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the parameters and the config to an ``.npz`` file, or a binary
        file object.  As with ``numpy.savez``, a path (str, bytes or
        os.PathLike) without the suffix gets ``.npz`` added; :meth:`load`
        with the same path reads that file."""
        header = json.dumps({"format": self._FORMAT, **self.config()})
        arrays = {name: kernel_view(a) for name, a in self.state_dict().items()}
        np.savez(saved_name(path), __config__=np.array(header), **arrays)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]):
        """Read a module written by :meth:`save`, from a path or a binary file
        object (no pickles are ever loaded).

        ``load(path)`` reads the file ``save(path)`` writes: ``path`` with
        ``.npz`` added when missing, or ``path`` itself when only it exists; a
        ValueError naming both when both exist.

        Member names and array headers are checked against the stored config
        before any array is read; a file that is not such a module raises
        ValueError with the reason.
        """
        cfg, arrays = read_module_file(path, cls._FORMAT, cls._DIMS, cls._param_shapes)
        try:
            m = cls._from_config(cfg)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{_source_name(path)}: __config__ holds settings the module "
                             f"refuses: {exc}") from None
        m.load_state_dict(arrays)
        return m

    # pickling: the arrays and the config, never compiled state

    def __getstate__(self) -> Dict[str, Any]:
        return {"config": self.config(), "state": self.state_dict()}

    def __setstate__(self, data: Dict[str, Any]) -> None:
        template = type(self)._from_config(data["config"])
        self.__dict__.update(template.__dict__)
        self.load_state_dict(data["state"])

    def __eq__(self, other: object) -> bool:
        """Same class, config and bit-identical parameters."""
        if type(other) is not type(self):
            return NotImplemented
        if self.config() != other.config():
            return False
        a, b = self.state_dict(), other.state_dict()
        # compared as bytes: a NaN weight equals its copy (a module equals its
        # pickle), and -0.0 differs from 0.0, as bits do
        return all(a[k].tobytes() == b[k].tobytes() for k in a)

    __hash__ = None  # mutable (weights can be reassigned)
