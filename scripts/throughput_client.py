#!/usr/bin/env python3
"""Throughput through the server: N completions of random token-id prompts (input_len tokens,
max_tokens output_len, ignore_eos), `concurrency` at a time, with the standard library only
(the GPU machine has no network and no extra packages). Prints one JSON line.

Usage: python3 scripts/throughput_client.py URL MODEL VOCAB N INPUT_LEN OUTPUT_LEN CONCURRENCY
"""
import concurrent.futures
import json
import random
import sys
import time
import urllib.request


def one(url, model, prompt, out_len):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": out_len, "ignore_eos": True,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)["usage"]


def main():
    url, model, vocab, n, n_in, n_out, conc = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(n_in)] for _ in range(n)]
    one(url, model, prompts[0][:16], 4)  # warm-up
    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(conc) as pool:
        usage = list(pool.map(lambda p: one(url, model, p, n_out), prompts))
    secs = time.time() - t
    total = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    out = sum(u["completion_tokens"] for u in usage)
    print(json.dumps({"requests": n, "seconds": secs, "total_tokens_per_s": total / secs,
                      "output_tokens_per_s": out / secs, "concurrency": conc}))


if __name__ == "__main__":
    main()
