"""Torch interop: state dicts in other libraries' names, torch modules both ways.

Three naming schemes map onto a module's parameters:

==================  =========================================  ===================
fastattn            torch.nn.MultiheadAttention                a query/key/value/fc module
==================  =========================================  ===================
w_q, w_k, w_v       in_proj_weight (stacked) or q/k/v_proj_weight  query/key/value.weight
b_q, b_k, b_v       in_proj_bias (stacked)                     query/key/value.bias
w_o, b_o            out_proj.weight, out_proj.bias             fc.weight, fc.bias
==================  =========================================  ===================

torch is never imported here: tensors are recognised by their methods.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from ._dtypes import BFLOAT16

from ._conventions import BatchFirstWarning, warn_caller
from ._validate import float_param

__all__ = ["to_own_names", "source_key", "torch_module_config", "TorchExport"]

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


def _shape(value: Any) -> tuple:
    return tuple(getattr(value, "shape", np.shape(value)))


def to_own_names(state: Mapping[str, Any], slices: Dict[str, slice], bias: bool,
                 embed_dim: int, sinks: bool = False) -> Dict[str, Any]:
    """Rename ``state`` to w_q ... b_o (and ``sinks``, which a module with
    sinks needs), splitting torch's stacked in_proj tensors.

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
        if key in _OWN or (sinks and key == "sinks"):
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
            arr = float_param(value, key)
            for part in ("q", "k", "v"):
                put(f"{kind}_{part}", arr[slices[part]], key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unexpected keys in state dict: {', '.join(sorted(map(repr, unknown)))}; expected fastattn names "
            f"{list(_OWN)}, torch.nn.MultiheadAttention names or the query/key/value/fc linears' names"
        )
    needed = (_OWN if bias else _OWN[:4]) + (("sinks",) if sinks else ())
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
    """(config, state dict) of a torch.nn.MultiheadAttention or a seed-style module.

    A sequence-first ``torch.nn.MultiheadAttention`` (``batch_first=False``,
    torch's default) is accepted, with a :class:`fastattn.BatchFirstWarning`:
    its weights are the same whatever its layout, but it took (L, B, D)
    inputs and fastattn's modules take (B, L, D), and an (L, B, D) array fed
    to one runs without error when L and B are any sizes (it attends over
    the batch), so the difference is said where it arises.  Refusing would
    make the commonest torch module a special case to port; a warning lets
    the port run and names the one change it needs.  Silence it, once the
    inputs are batch-first, with ``warnings.filterwarnings("ignore",
    category=fastattn.BatchFirstWarning)``.
    """
    params = dict(module.state_dict()) if hasattr(module, "state_dict") else None
    if params is None:
        raise TypeError(f"from_torch expects a torch module, got {type(module).__name__}")
    if "in_proj_weight" in params or "q_proj_weight" in params:
        if getattr(module, "bias_k", None) is not None or getattr(module, "add_zero_attn", False):
            raise ValueError(
                "from_torch: add_bias_kv and add_zero_attn of torch.nn.MultiheadAttention "
                "are not supported"
            )
        if getattr(module, "batch_first", True) is False:
            warn_caller(
                "from_torch: this torch.nn.MultiheadAttention is sequence-first "
                "(batch_first=False, torch's default): it took inputs of shape (L, B, D), and "
                "fastattn's modules take (B, L, D).  The weights carry over unchanged; "
                "transpose inputs with x.transpose(1, 0, 2) (and the output back), or build "
                "the torch module with batch_first=True.", BatchFirstWarning)
        embed_dim = int(module.embed_dim)
        num_heads = int(module.num_heads)
        kdim = int(getattr(module, "kdim", embed_dim))
        vdim = int(getattr(module, "vdim", embed_dim))
        bias = "in_proj_bias" in params and params["in_proj_bias"] is not None
        weight = params.get("in_proj_weight", params.get("q_proj_weight"))
        if not bias:
            params = {k: v for k, v in params.items() if not k.endswith("bias")}
    elif all(f"{n}.weight" in params for n in ("query", "key", "value", "fc")):
        if not hasattr(module, "num_heads"):
            raise ValueError("from_torch: the module has query/key/value/fc but no num_heads")
        num_heads = int(module.num_heads)
        weight = params["query.weight"]
        embed_dim = int(weight.shape[1])
        kdim, vdim = int(params["key.weight"].shape[1]), int(params["value.weight"].shape[1])
        bias = "query.bias" in params
    else:
        raise TypeError(
            f"from_torch expects torch.nn.MultiheadAttention or a module with query, key, "
            f"value and fc linear layers, got {type(module).__name__}"
        )
    # the module's own type where fastattn has it (float16 and bfloat16
    # included), float32 otherwise
    dtype = {"torch.float64": np.float64, "torch.bfloat16": BFLOAT16,
             "torch.float16": np.float16}.get(str(weight.dtype), np.float32)
    cfg = {"embed_dim": embed_dim, "num_heads": num_heads, "kdim": kdim, "vdim": vdim, "bias": bias,
           "dtype": dtype}
    return cfg, params


class TorchExport:
    """A module's way to torch: :meth:`to_torch`."""

    def to_torch(self):
        """A ``torch.nn.MultiheadAttention`` (batch_first=True, eval mode) with these
        weights, which gives the same outputs (with torch's mask conventions).

        Raises ImportError without torch, and ValueError for what torch's
        class cannot express: grouped-query heads, ``rotary``, ``scale``,
        ``softcap``, ``window``, ``sinks``, or a ``head_dim`` with
        ``num_heads * head_dim != embed_dim``.
        """
        try:
            import torch
        except ImportError:
            raise ImportError("to_torch needs PyTorch (on a CPU-only machine, its CPU wheel: "
                              "see the README)") from None
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"to_torch: torch.nn.MultiheadAttention has no grouped-query attention "
                f"(num_kv_heads {self.num_kv_heads} != num_heads {self.num_heads})"
            )
        extras = [name for name in ("rotary", "scale", "softcap", "window")
                  if getattr(self, name) is not None]
        extras += ["sinks"] * self.has_sinks
        extras += ["head_dim"] * (self.q_dim != self.embed_dim)
        if extras:
            raise ValueError(f"to_torch: torch.nn.MultiheadAttention cannot express this "
                             f"module's {', '.join(extras)}")
        tdtype = {np.dtype(np.float64): torch.float64, BFLOAT16: torch.bfloat16,
                  np.dtype(np.float16): torch.float16}.get(self.dtype, torch.float32)

        def tensor(a):
            # torch reads no ml_dtypes array: bfloat16 goes over as its bits
            if a.dtype == BFLOAT16:
                return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
            return torch.from_numpy(a.copy())

        t = torch.nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=self.bias,
                                        kdim=self.kdim, vdim=self.vdim, batch_first=True,
                                        dtype=tdtype)
        # copies: torch tensors over read-only arrays are not to be written
        arrays = self._state.arrays
        state = {"out_proj.weight": tensor(arrays["w_o"])}
        if self.fused:
            state["in_proj_weight"] = tensor(arrays["w_qkv"])
        else:
            for part in "qkv":
                state[f"{part}_proj_weight"] = tensor(arrays["w_" + part])
        if self.bias:
            state["in_proj_bias"] = tensor(arrays["b_qkv"])
            state["out_proj.bias"] = tensor(arrays["b_o"])
        t.load_state_dict(state)
        return t.eval()
