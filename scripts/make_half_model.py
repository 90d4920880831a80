#!/usr/bin/env python3
"""Write the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) as Hugging Face folders for benchmarks:
a bfloat16 checkpoint and its 4-bit AWQ and GPTQ twins.

Usage (torch, transformers 5, gguf, safetensors, numpy and compressed-tensors are only needed here):
    .cache/refvenv/bin/python scripts/make_half_model.py [--gguf PATH] [--out DIR] [bf16] [awq] [gptq]

The GGUF file is `<cache>/SmolLM2-135M-Instruct.Q4_1.gguf` (`cargo xtask fetch-model` or any run of
the default model puts it there; `<cache>` is ~/.cache/vllm-rs, or $VLLM_RS_CACHE). transformers'
GGUF loader dequantizes it to float32 (`from_pretrained(dir, gguf_file=...)`, its tokenizer and chat
template too); the folders go next to it, not into the repository:

  SmolLM2-135M-Instruct-bf16  every tensor in bfloat16 (round to nearest even), as bfloat16
                              checkpoints ship: what `--dtype auto` runs on the half-precision kernel
                              and what vLLM's CPU backend serves side by side (`bench latency --peer vllm`)
  SmolLM2-135M-Instruct-awq   AWQ GEMM (`quant_method: awq`, 4 bits, group 32, zero points)
  SmolLM2-135M-Instruct-gptq  GPTQ (`quant_method: gptq`, 4 bits, group 32, asymmetric, no act order)

In the AWQ and GPTQ folders every q/k/v/o/gate/up/down_proj weight is quantized by round to nearest
(no calibration), asymmetric 4-bit per group of 32 input channels, with the quantization and packing
functions of scripts/make_quant_fixtures.py (imported: the fixtures' layouts, each packing checked by
its independent unpacker); embeddings and norms stay float16 (the tied output matrix with them), as
AutoAWQ and AutoGPTQ write them. GPTQ's v1 format stores `zero - 1` and cannot hold a zero point of
0: if a group needs one, the folder is written as `checkpoint_format: gptq_v2` instead (said when it
happens). The GGUF's Q4_1 blocks (32 weights, float16 scale and minimum) are requantized, not copied:
AWQ and GPTQ zero points are integers.

`quantization_config` (the GGUF loader's record of the source) is dropped from every saved config.
"""
import argparse
import json
import os
import sys

import torch
import transformers as tf
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_quant_fixtures as mq  # noqa: E402  (its packing and checks; importing runs nothing)

NAME = "SmolLM2-135M-Instruct"
LINEARS = mq.LINEARS


def cache_dir():
    return os.environ.get("VLLM_RS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vllm-rs")


def load(gguf):
    d, f = os.path.split(gguf)
    model = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


def save_config(model, out, dtype, quantization_config=None):
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    cfg["architectures"] = [type(model).__name__]  # the GGUF loader leaves it empty
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_common(model, tok, out):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        p = os.path.join(out, f)
        if os.path.isfile(p):
            os.remove(p)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def state(model):
    """The model's tensors by checkpoint name (the tied output matrix once, as embed_tokens)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_bf16(model, tok, out):
    save_common(model, tok, out)
    tensors = {k: v.to(torch.bfloat16) for k, v in state(model).items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    save_config(model, out, "bfloat16")
    return tensors


def write_quantized(model, tok, out, kind):
    save_common(model, tok, out)
    sd = state(model)
    layers = model.config.num_hidden_layers
    prefixes = [f"model.layers.{i}.{l}" for i in range(layers) for l in LINEARS]
    tensors = {k: v.to(torch.float16) for k, v in sd.items() if not any(k == p + ".weight" for p in prefixes)}
    quants = {p: mq.quantize_int(sd[p + ".weight"], 4, 32, sym=False) for p in prefixes}
    if kind == "awq":
        qc = mq.awq_config(32)
        for p, qz in quants.items():
            t = mq.awq_tensors(p, qz)
            mq.check_unpacked(mq.unpack_awq(t, p, 32), qz, f"awq {p}")
            tensors.update(t)
    else:
        v2 = any(int(qz.z.min()) == 0 for qz in quants.values())
        if v2:
            print("gptq: a group has zero point 0, which GPTQ v1 cannot store: writing checkpoint_format gptq_v2")
        qc = mq.gptq_config(4, sym=False, v2=v2)
        for p, qz in quants.items():
            t = mq.gptq_tensors(p, qz, v2=v2)
            mq.check_unpacked(mq.unpack_gptq(t, p, 4, v2), qz, f"gptq {p}")
            tensors.update(t)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    save_config(model, out, "float16", qc)
    err = max((qz.twin() - sd[p + ".weight"]).abs().max().item() for p, qz in quants.items())
    return err


def size_mb(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=os.path.join(cache_dir(), f"{NAME}.Q4_1.gguf"))
    ap.add_argument("--out", default=cache_dir(), help="folder the model folders are written into")
    ap.add_argument("which", nargs="*", help="bf16, awq, gptq (default: all three)")
    a = ap.parse_args()
    a.which = a.which or ["bf16", "awq", "gptq"]
    if set(a.which) - {"bf16", "awq", "gptq"}:
        ap.error(f"unknown folder kind in {a.which}: bf16, awq or gptq")
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    model, tok = load(a.gguf)
    for which in a.which:
        out = os.path.join(a.out, f"{NAME}-{which}")
        if which == "bf16":
            write_bf16(model, tok, out)
            note = "bfloat16"
        else:
            err = write_quantized(model, tok, out, which)
            note = f"4-bit g32 asymmetric, largest weight change {err:.4f} from the GGUF's dequantized values"
        print(f"{out}: {note}, {size_mb(out):.1f} MB")


if __name__ == "__main__":
    main()
