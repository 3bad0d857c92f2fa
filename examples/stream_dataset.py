"""Stream a dataset of sequences through MultiHeadSelfAttention on a Dask cluster.

    python examples/stream_dataset.py --input seqs.npy --output out.npy
    python examples/stream_dataset.py --make 4096          # synthesise seqs.npy first
    python examples/stream_dataset.py --scheduler tcp://host:8786 ...   # an existing cluster

The input is a (num_sequences, N, D) float32 .npy file; each task memory-maps
it and reads only its own chunk, so the dataset never passes through the
client or the scheduler.  The output goes to a .npy file written chunk by
chunk in place (every worker must see the same filesystem), or to a zarr store
when the output path ends in .zarr and zarr is installed.
"""

import argparse
import os
import time

import numpy as np

import dask
import dask.array as da
from distributed import Client, LocalCluster, progress, wait

import fastattn
import fastattn.dask


def load_chunk(path, lo, hi):
    """Rows lo:hi of the .npy file, read by the worker that runs the task."""
    return np.array(np.load(path, mmap_mode="r")[lo:hi])


class NpyWriter:
    """A da.store target that writes a region of an existing .npy file in place.

    It pickles as its path, so any worker on a shared filesystem can write.
    """

    def __init__(self, path):
        self.path = path

    def __setitem__(self, index, value):
        out = np.load(self.path, mmap_mode="r+")
        out[index] = value
        out.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="seqs.npy")
    p.add_argument("--output", default="out.npy")
    p.add_argument("--make", type=int, default=0, help="first write this many random sequences to --input")
    p.add_argument("--seq", type=int, default=128, help="N, with --make")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--chunk", type=int, default=256, help="sequences per task")
    p.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (no --scheduler)")
    args = p.parse_args()

    if args.make:
        rng = np.random.default_rng(0)
        data = np.lib.format.open_memmap(args.input, mode="w+", dtype=np.float32,
                                         shape=(args.make, args.seq, args.d_model))
        for lo in range(0, args.make, 1024):
            hi = min(lo + 1024, args.make)
            data[lo:hi] = rng.standard_normal((hi - lo, args.seq, args.d_model), dtype=np.float32)
        data.flush()
        del data

    shape = np.load(args.input, mmap_mode="r").shape
    S, N, D = shape
    module = fastattn.MultiHeadSelfAttention(D, args.heads, seed=0)

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None)
        client = Client(cluster)

    path = os.path.abspath(args.input)
    blocks = [
        da.from_delayed(dask.delayed(load_chunk)(path, lo, min(lo + args.chunk, S)),
                        shape=(min(lo + args.chunk, S) - lo, N, D), dtype=np.float32)
        for lo in range(0, S, args.chunk)
    ]
    x = da.concatenate(blocks, axis=0)
    y = fastattn.dask.apply(module, x, client=client)

    t0 = time.perf_counter()
    if args.output.endswith(".zarr"):
        stored = y.to_zarr(args.output, compute=False, overwrite=True)
    else:
        np.lib.format.open_memmap(args.output, mode="w+", dtype=y.dtype, shape=y.shape).flush()
        stored = da.store(y, NpyWriter(os.path.abspath(args.output)), lock=False, compute=False)
    future = client.compute(stored)
    progress(future)
    wait(future)
    future.result()
    elapsed = time.perf_counter() - t0
    print(f"\n{S} sequences of ({N}, {D}) in {elapsed:.2f} s: {S / elapsed:.1f} sequences/s "
          f"on {len(client.scheduler_info()['workers'])} workers -> {args.output}")
    client.close()


if __name__ == "__main__":
    main()
