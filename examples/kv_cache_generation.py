"""A KV-cache generation loop: a toy one-layer decoder generating tokens.

Token embeddings, one self-attention layer with rotary embeddings
(fastattn.MultiHeadSelfAttention, grouped-query heads) and an output matrix
over a small vocabulary, all random: the point is the loop, not the text.
The prompt is prefilled in one call, then each new token is one call over
the cache.  At the end the whole sequence is run once, causally, and must
give the same logits as the step-by-step loop.

    python examples/kv_cache_generation.py [--prompt 32] [--new 32] [--batch 4]

A batch of prompts of different lengths prefills in one call too
(``lengths=``), each then decoding at its own position.
"""

import argparse
import time

import numpy as np

import fastattn


def main():
    ap = argparse.ArgumentParser(description="Greedy generation over a fastattn KV cache.")
    ap.add_argument("--prompt", type=int, default=32, help="longest prompt length")
    ap.add_argument("--new", type=int, default=32, help="tokens to generate")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    D, V, B = args.dim, args.vocab, args.batch
    embed = rng.standard_normal((V, D), dtype=np.float32) / np.sqrt(D)
    unembed = rng.standard_normal((D, V), dtype=np.float32) / np.sqrt(D)
    layer = fastattn.MultiHeadSelfAttention(D, 8, num_kv_heads=2, seed=0,
                                            rotary=fastattn.Rotary(D // 8))

    def logits(tokens_out):
        return tokens_out @ unembed

    # prompts of different lengths, padded to the longest
    lengths = rng.integers(args.prompt // 2, args.prompt + 1, B)
    lengths[0] = args.prompt
    prompts = rng.integers(0, V, (B, args.prompt))
    cache = layer.new_cache(B, args.prompt + args.new)
    t0 = time.perf_counter()
    h = layer(embed[prompts], cache=cache, lengths=lengths)      # prefill, one call
    last = h[np.arange(B), lengths - 1]                           # each prompt's last row
    generated = [[] for _ in range(B)]
    step_logits = [[] for _ in range(B)]
    for _ in range(args.new):
        scores = logits(last)
        tokens = scores.argmax(-1)                                 # greedy
        for b in range(B):
            generated[b].append(int(tokens[b]))
            step_logits[b].append(scores[b])
        last = layer(embed[tokens][:, None], cache=cache)[:, 0]   # one token each
    elapsed = time.perf_counter() - t0
    print(f"generated {args.new} tokens for {B} sequences (prompts of {lengths.tolist()}) in "
          f"{1e3 * elapsed:.1f} ms; cache lengths now {cache.lengths.tolist()}")

    # the same sequences run whole, causally, without a cache
    worst = 0.0
    for b in range(B):
        seq = np.concatenate([prompts[b, :lengths[b]], generated[b]])
        full = logits(layer(embed[seq][None], is_causal=True)[0])
        # row lengths[b]-1 predicts the first new token, and so on
        want = full[lengths[b] - 1:lengths[b] - 1 + args.new]
        got = np.stack(step_logits[b])
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(f"step-by-step logits against the full causal forward: max relative difference "
          f"{worst:.1e}")
    assert worst < 1e-4, worst


if __name__ == "__main__":
    main()
