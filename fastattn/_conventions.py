"""PyTorch habits that would give silently different results: the warnings
fastattn gives for them, and the messages for torch's argument names.

fastattn's calls mirror torch's, with a few differences a torch user will not
expect (the README's "Coming from PyTorch" lists them).  Where a difference
can be seen in what a call is given, it is said there and then:

* a bool ``attn_mask`` that blocks every key of every query, or that is
  torch's causal mask with True above the diagonal: most likely a mask in
  ``torch.nn.MultiheadAttention``'s convention (True = blocked), the opposite
  of fastattn's (True = may attend) -> :class:`MaskConventionWarning`; so
  does a ``key_padding_mask`` that pads every key (True = keep, read as
  padding); torch's 3-D (B * num_heads, Lq, Lk) mask gets a reshape hint
  in its shape error (fastattn._validate);
* ``from_torch`` of a sequence-first ``torch.nn.MultiheadAttention`` (torch's
  default ``batch_first=False``) -> :class:`BatchFirstWarning`;
* torch's argument names fastattn has no use for (``dropout``,
  ``batch_first`` ...) -> a TypeError that names fastattn's equivalent or says
  why there is none (:func:`torch_names`), where a bare "unexpected keyword
  argument" would leave the user guessing.  Values whose meaning is the same
  in fastattn (``dropout=0``, ``batch_first=True``, ``enable_gqa``) are
  accepted;
* a write into a weight's read-only copy (``m.w_q[:] = 0``) -> a ValueError
  pointing to assignment (``fastattn._params.ReadOnlyParameter``).
"""

from __future__ import annotations

import inspect
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["MaskConventionWarning", "BatchFirstWarning", "warn_caller", "torch_names",
           "too_many_positional", "hide_catchall", "short_repr",
           "CONSTRUCTOR_NAMES", "SELF_ATTENTION_NAMES", "SDPA_NAMES", "CALL_NAMES"]


class MaskConventionWarning(UserWarning):
    """A bool mask that most likely follows ``torch.nn.MultiheadAttention``'s
    convention (True = blocked) instead of fastattn's (True = may attend).

    Silence it, where the mask is meant as given, with
    ``warnings.filterwarnings("ignore", category=fastattn.MaskConventionWarning)``.
    """


class BatchFirstWarning(UserWarning):
    """``from_torch`` of a sequence-first ``torch.nn.MultiheadAttention``
    (``batch_first=False``, torch's default): the weights carry over, but
    fastattn's modules take (B, L, D) inputs where the torch module took
    (L, B, D).

    Silence it, once the inputs are batch-first, with
    ``warnings.filterwarnings("ignore", category=fastattn.BatchFirstWarning)``.
    """


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_caller(message: str, category: type) -> None:
    """``warnings.warn`` attributed to the first frame outside fastattn (the
    user's line), however deep in the package the check ran."""
    # stacklevel 1 is this function, 2 its caller
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# ---- torch's argument names ----------------------------------------------------------

def _zero(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and float(value) == 0.0)


def _is(expected: bool) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (bool, np.bool_)) and bool(value) is expected


def _on_cpu(value: Any) -> bool:
    # None, "cpu" or torch.device("cpu"): torch is never imported
    return value is None or str(value) == "cpu"


_NO_DROPOUT = ("fastattn is for inference and has no dropout (torch applies it only in "
               "training); pass {name}=0 or leave it out")
_BATCH_FIRST = ("fastattn modules are always batch-first, taking (B, L, D) where "
                "torch.nn.MultiheadAttention's default takes (L, B, D); transpose "
                "sequence-first inputs with x.transpose(1, 0, 2) and leave batch_first out "
                "(batch_first=True is accepted and changes nothing)")

# name -> (accepted values, or None: none; why, with fastattn's equivalent).
# {name} in a message is the argument's name.
Rule = Tuple[Optional[Callable[[Any], bool]], str]

CONSTRUCTOR_NAMES: Dict[str, Rule] = {
    "dropout": (_zero, _NO_DROPOUT),
    "batch_first": (_is(True), _BATCH_FIRST),
    "add_bias_kv": (_is(False),
                    "fastattn has no learned bias rows appended to the keys and values "
                    "(torch.nn.MultiheadAttention's add_bias_kv); leave it out"),
    "add_zero_attn": (_is(False),
                      "torch's zero key and value row is an attention sink of logit 0: pass "
                      "sinks=True instead (its sinks start at 0), which gives the same "
                      "outputs; need_weights then returns no column for it"),
    "device": (_on_cpu,
               "fastattn computes on the CPU over NumPy arrays and has no device to choose "
               "(tensors passed in on another device are copied to the CPU); leave it out"),
}

# on MultiHeadSelfAttention only (MultiHeadAttention takes them)
SELF_ATTENTION_NAMES: Dict[str, Rule] = {
    name: (None, "MultiHeadSelfAttention projects one input, whose width is embed_dim; for "
                 "keys and values of other widths use fastattn.MultiHeadAttention(embed_dim, "
                 "num_heads, kdim=..., vdim=...)")
    for name in ("kdim", "vdim")
}

_QKV = ("fastattn names the inputs q, k and v (torch: query, key, value); pass them "
        "positionally or as q=, k=, v=")
SDPA_NAMES: Dict[str, Rule] = {
    "dropout_p": (_zero, _NO_DROPOUT),
    "enable_gqa": (lambda value: isinstance(value, (bool, np.bool_)),
                   "it is True or False, and either way grouped-query heads are taken "
                   "automatically when k and v have fewer heads than q"),
    "query": (None, _QKV), "key": (None, _QKV), "value": (None, _QKV),
}

# a module's call (torch's forward takes none of these either; they are the
# functional API's or the constructor's)
CALL_NAMES: Dict[str, Rule] = {
    "dropout_p": (None, "fastattn is for inference and has no dropout; leave it out"),
    "dropout": (None, "fastattn is for inference and has no dropout; leave it out"),
    "batch_first": (None, "fastattn modules are always batch-first, taking (B, L, D); "
                          "transpose sequence-first inputs with x.transpose(1, 0, 2)"),
    "enable_gqa": (None, "grouped-query attention is the module's num_kv_heads (set at "
                         "construction); leave it out"),
    "scale": (None, "the scale is the module's, set at construction (scale=...)"),
}


def short_repr(value: Any) -> str:
    """``value`` for a message: an array or tensor by its type and shape."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (numbers.Number, np.generic)):
        return f"<{type(value).__name__} of shape {tuple(shape)}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def too_many_positional(caller: str, names: Tuple[str, ...], given: int, torch_next: str) -> None:
    """TypeError for ``given`` positional arguments where ``caller`` takes
    ``names``; ``torch_next`` says what torch's signature has next."""
    raise TypeError(f"{caller}() takes {len(names)} positional arguments "
                    f"({', '.join(names)}) but {given} were given: the other arguments are "
                    f"keyword-only ({torch_next})")


def hide_catchall(func: Callable) -> Callable:
    """``func`` with the signature help() and IDEs show without its ``*args``
    and ``**kwargs``, which only catch torch's arguments to explain them."""
    sig = inspect.signature(func)
    func.__signature__ = sig.replace(parameters=[
        p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)])
    return func


def torch_names(caller: str, given: Mapping[str, Any], *rules: Mapping[str, Rule]) -> None:
    """Checks the keyword arguments ``given`` that ``caller`` has no
    parameter for: a torch name whose value means the same in fastattn
    passes; another torch name raises TypeError with its reason and
    fastattn's equivalent; any other name raises Python's own TypeError."""
    for name, value in given.items():
        rule = next((r[name] for r in rules if name in r), None)
        if rule is None:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        accepts, why = rule
        if accepts is not None and accepts(value):
            continue
        raise TypeError(f"{caller}() does not take {name}={short_repr(value)}: "
                        f"{why.format(name=name)}")
