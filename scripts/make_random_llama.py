#!/usr/bin/env python3
"""Write a random-weight Llama checkpoint (config.json + model.safetensors) for throughput runs.

Only PyTorch is needed (the GPU machine has it; no transformers, no safetensors package, no
network): weights are drawn on the GPU when there is one, in bfloat16, and written in the
safetensors format by hand (8-byte header length, JSON header, raw tensor bytes).

Shapes:
    8b    Llama-3-8B's shape: 32 layers, hidden 4096, 32 heads over 8 KV heads of 128,
          MLP 14336, vocabulary 128256 (about 16 GB in bfloat16)
    1b    a 16-layer, 2048-wide Llama (about 2.5 GB)
    tiny  2 layers, hidden 256, 4 heads over 2 KV heads of 64, vocabulary 1024 (the CPU
          rehearsal of scripts/gpu_acceptance.sh)

Usage: python3 scripts/make_random_llama.py --shape 8b --out DIR
"""
import argparse
import json
import os
import struct
import time

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
}


def tensors(cfg):
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = dict(SHAPES[args.shape], architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
               torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    specs = list(tensors(cfg))
    header, offset = {}, 0
    for name, shape in specs:
        n = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    t = time.time()
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in specs:
            if len(shape) == 1:
                w = torch.ones(shape, dtype=torch.bfloat16, device=dev)
            else:
                w = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            f.write(w.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    print(f"make_random_llama: {args.shape} ({offset / 1e9:.2f} GB of bf16 weights) in {args.out}, "
          f"{time.time() - t:.0f} s on {dev}")


if __name__ == "__main__":
    main()
