#!/usr/bin/env python3
"""Writes a random-weight Llama of about 1.1B parameters (TinyLlama's shape: 22 layers,
hidden 2048, FFN 5632, 32 heads, 4 KV heads) as a Q4_K_M GGUF, for speed comparisons where
the matmul kernels, not per-step overheads, decide (issue #18). Random weights are fine for
speed; the output is gibberish.

The tokenizer (and chat template) is copied from the packaged SmolLM2 GGUF, so both engines
can tokenize. The float16 file is written with the `gguf` package and quantized with
llama.cpp's own `llama-quantize` (built by `cargo xtask bench build-peer`).

    python3 -m venv .cache/ggvenv && .cache/ggvenv/bin/pip install gguf numpy
    .cache/ggvenv/bin/python scripts/make_random_llama_gguf.py \
        --tokenizer-from ~/.cache/vllm-rs/SmolLM2-135M-Instruct.Q4_1.gguf \
        --llama-quantize ~/.cache/vllm-rs/peers/llama.cpp-0.3.36/bin/llama-quantize \
        --out ~/.cache/vllm-rs/random-llama-1.1b.Q4_K_M.gguf
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import gguf


def field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-from", required=True)
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    src = gguf.GGUFReader(a.tokenizer_from)
    tokens = field_value(src, "tokenizer.ggml.tokens")
    vocab = len(tokens)
    head_dim = a.hidden // a.heads
    f16_path = a.out + ".f16.tmp"
    w = gguf.GGUFWriter(f16_path, "llama")
    w.add_name("random-llama-1.1b")
    w.add_block_count(a.layers)
    w.add_context_length(4096)
    w.add_embedding_length(a.hidden)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(field_value(src, "tokenizer.ggml.model"))
    pre = field_value(src, "tokenizer.ggml.pre")
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(field_value(src, "tokenizer.ggml.token_type"))
    merges = field_value(src, "tokenizer.ggml.merges")
    if merges:
        w.add_token_merges(merges)
    for key, add in [
        ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
        ("tokenizer.ggml.unknown_token_id", w.add_unk_token_id),
        ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
        ("tokenizer.ggml.add_bos_token", w.add_add_bos_token),
        ("tokenizer.chat_template", w.add_chat_template),
    ]:
        v = field_value(src, key)
        if v is not None:
            add(v)

    rng = np.random.default_rng(a.seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    params = 0

    def add(name, arr):
        nonlocal params
        params += arr.size
        w.add_tensor(name, arr)

    kv = a.kv_heads * head_dim
    add("token_embd.weight", mat(vocab, a.hidden))
    for i in range(a.layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", np.ones(a.hidden, dtype=np.float32))
        add(p + "attn_q.weight", mat(a.hidden, a.hidden))
        add(p + "attn_k.weight", mat(kv, a.hidden))
        add(p + "attn_v.weight", mat(kv, a.hidden))
        add(p + "attn_output.weight", mat(a.hidden, a.hidden))
        add(p + "ffn_norm.weight", np.ones(a.hidden, dtype=np.float32))
        add(p + "ffn_gate.weight", mat(a.ffn, a.hidden))
        add(p + "ffn_up.weight", mat(a.ffn, a.hidden))
        add(p + "ffn_down.weight", mat(a.hidden, a.ffn))
    add("output_norm.weight", np.ones(a.hidden, dtype=np.float32))
    add("output.weight", mat(vocab, a.hidden))
    print(f"writing {f16_path}: {params / 1e9:.2f}B parameters", file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    print(f"quantizing to {a.type} with {a.llama_quantize}", file=sys.stderr)
    subprocess.run([a.llama_quantize, f16_path, a.out, a.type, str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    os.remove(f16_path)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.0f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
