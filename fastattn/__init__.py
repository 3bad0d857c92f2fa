"""fastattn: multi-head attention on the CPU over NumPy arrays.

Cython kernels parallelised with OpenMP compute per-head scaled scores, a
streaming (online) softmax and the weighted sum of values without holding an
``Lq x Lk`` score matrix; a thin Python layer validates, decides and keeps the
weights.  See ``fastattn.functional`` for the mask conventions and
docs/architecture.md for one call's path through the layers::

    public API      MultiHeadSelfAttention, MultiHeadAttention, KVCache,
                    scaled_dot_product_attention, varlen_attention,
                    merge_attention, alibi_slopes, Rotary, apply_rotary
                    (rotary.py), threads, info, from_hf (hf.py: Hugging Face
                    attention layers)
        |
    modules.py (config, call, forward)      functional.py (sdpa, attention_into)
        |
    _validate.py (every input check)  _params.py (weights, packing)
    _conventions.py (torch habits: warnings, torch's argument names)
    _fastpath.py (m(x), one gate)     _policy.py (block sizes, schedules)
    io.py  interop.py  cache.py  threads.py
        |
    _dispatch.py: the widest build this CPU runs
        |
    _kernels/: _driver (compiled once: entry points, checks, plan, the one
               parallel skeleton) + one build per ISA of the work items,
               typed from a template, handed over as a table of C pointers
        |
    _kernels/src/: C headers by concern: fa_vec.h (vector primitives), fa_gemm.h
           (GEMM, packing), fa_softmax.h (online softmax), fa_mask.h (masks)

``fastattn.tools`` holds the bench, peers and scaling study the command line
(``python -m fastattn``) runs.
"""

from ._conventions import BatchFirstWarning, MaskConventionWarning
from .cache import KVCache
from .functional import (alibi_slopes, merge_attention, scaled_dot_product_attention,
                         varlen_attention)
from .hf import from_hf
from .rotary import Rotary, apply_rotary
from .info import info
from .modules import MultiHeadAttention, MultiHeadSelfAttention
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MultiHeadSelfAttention",
    "MultiHeadAttention",
    "KVCache",
    "from_hf",
    "scaled_dot_product_attention",
    "alibi_slopes",
    "merge_attention",
    "varlen_attention",
    "Rotary",
    "apply_rotary",
    "get_num_threads",
    "set_num_threads",
    "info",
    "MaskConventionWarning",
    "BatchFirstWarning",
]
