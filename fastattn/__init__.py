"""fastattn: multi-head attention on the CPU over NumPy arrays.

Cython kernels parallelised with OpenMP compute per-head scaled scores, a
streaming (online) softmax and the weighted sum of values without holding an
``Lq x Lk`` score matrix; a thin Python layer handles validation, weights and
head splitting.  See ``fastattn.functional`` for the mask conventions.
"""

from .cache import KVCache
from .functional import alibi_slopes, scaled_dot_product_attention
from .info import info
from .modules import MultiHeadAttention, MultiHeadSelfAttention
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "MultiHeadSelfAttention",
    "MultiHeadAttention",
    "KVCache",
    "scaled_dot_product_attention",
    "alibi_slopes",
    "get_num_threads",
    "set_num_threads",
    "info",
]
