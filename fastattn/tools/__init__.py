"""Tooling around the library, not needed to use it: what the command line
(``python -m fastattn bench|scaling|demo``) and ``benchmarks/`` run.

``benchmark``   fastattn against its peers, timed in interleaved rounds
``peers``       the peers: PyTorch, ONNX Runtime, NumPy (as far as installed)
``scaling``     the study of why attention divides q.k by sqrt(d_k)
``numpy_seed``  the seed's forward pass in plain NumPy (the bench's and demo's
                NumPy peer; the tests keep their own float64 reference)
``_progress``   the command line's progress bar
"""
