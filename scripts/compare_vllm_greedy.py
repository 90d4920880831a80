#!/usr/bin/env python3
"""Greedy continuations of the real vLLM (CPU backend) and of vllm-rs on the same Hugging Face
folder, side by side: a second reference for quantized checkpoints (issue #30).

Usage (vLLM's venv per ../shared/PEERS.md; our release server binary built):
    HF_HUB_OFFLINE=1 <vllm-venv>/bin/python scripts/compare_vllm_greedy.py FOLDER [FOLDER ...] \
        [--server target/release/vllm-server] [--tokens 32]

For each folder: vLLM's `LLM.generate` (enforce_eager, the dtype vLLM picks for the format: float16 for AWQ and GPTQ,
temperature 0, ignore_eos) on a few English prompts tokenized by the folder's tokenizer, then
our server on the same token ids through /v1/completions; prints per prompt how many leading
tokens agree and the first position where they differ. vLLM's CPU attention does not take head
sizes under 32, so the tiny fixtures of scripts/make_quant_fixtures.py (head size 16) cannot
run there; the default model's AWQ / GPTQ folders (scripts/make_half_model.py) can.
"""
import argparse, json, os, socket, subprocess, sys, time, urllib.request

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
           "The three primary colors are", "Water boils at"]


def ours(server, folder, prompts, tokens):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    proc = subprocess.Popen([server, "--model", folder, "--port", str(port), "--max-model-len", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        out = []
        for p in prompts:
            body = json.dumps({"prompt": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                               "return_token_ids": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            r = json.load(urllib.request.urlopen(req, timeout=300))
            out.append(r["choices"][0]["token_ids"])
        return out
    finally:
        proc.terminate(); proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--server", default="target/release/vllm-server")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    report = {}
    for folder in a.folders:
        tok = AutoTokenizer.from_pretrained(folder)
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        llm = LLM(model=folder, enforce_eager=True, max_model_len=512)
        sp = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
        theirs = [list(o.outputs[0].token_ids) for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp)]
        del llm
        mine = ours(a.server, folder, prompts, a.tokens)
        rows = []
        for text, t, m in zip(PROMPTS, theirs, mine):
            same = next((i for i, (x, y) in enumerate(zip(t, m)) if x != y), len(t))
            rows.append({"prompt": text, "agree": same, "of": len(t)})
            print(f"{os.path.basename(folder)}: {text!r}: {same}/{len(t)} tokens agree", flush=True)
        report[os.path.basename(folder)] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
