#!/usr/bin/env python3
"""Write small LoRA adapters (PEFT folders) with float32 references computed by transformers + peft.

Every adapter is created by `peft` (LoraConfig + get_peft_model) on one of the tiny random base
checkpoints written by scripts/make_model_fixtures.py, then every lora_A / lora_B is overwritten
with seeded random values (PEFT's own initialisation leaves lora_B at zero, which would make the
adapter a no-op) and the folder is written with `save_pretrained(..., safe_serialization=True)`:
adapter_config.json + adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`
[r, in] and `<module>.lora_B.weight` [out, r] (also for GPT-2's Conv1D layers, whose base weight is
stored [in, out]). The adapter is then loaded back from disk (PeftModel.from_pretrained on a fresh
base) and reference.json is written in the format of fixtures/models/<name>/reference.json:

    {"architecture", "transformers", "torch", "peft", "base": "fixtures/models/llama",
     "adapter": {"r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "scales": {"<module>": alpha/r or alpha/sqrt(r)}},
     "cases": [{"prompt": ids, "logits": per-position rows (adapter applied),
                "greedy": 16 tokens (adapter applied), "base_greedy": 16 tokens without it}]}

with the same prompts as the model fixtures, logits of every prompt position, and a 16-token
greedy continuation (do_sample=False, min_new_tokens=16, eos_token_id=None).

Fixtures under fixtures/lora/<name>/:
  llama_r8_qv       llama, r=8 alpha=16, q_proj v_proj (+ adapter.gguf from llama.cpp)
  llama_r4_all      llama, r=4 alpha=8, every decoder linear layer
  llama_rslora_r16  llama, r=16 alpha=32 use_rslora (scale alpha/sqrt(r) = 8), q/k/v/o
  llama_patterns    llama, r=4 alpha=8, q/v/down, rank_pattern down_proj=8, alpha_pattern
                    v_proj=4, layers_to_transform [1]
  qwen2_r8          qwen2 (biased Q/K/V, tied embeddings), r=8 alpha=16, q/k/v/o
  phi3_r8           phi3 (fused qkv_proj, gate_up_proj), r=8 alpha=16, qkv/o/gate_up/down
  gpt2_r8           gpt2 (Conv1D, fan_in_fan_out=True), r=8 alpha=16, c_attn c_proj c_fc
  llama_r8_qv_b     llama, another seed, r=8 alpha=16, q/v/o (to mix adapters in one batch)
  qwen2_embed_head  qwen2 (tied embeddings), r=8 alpha=16, q_proj + embed_tokens (lora_embedding_A
                    [r, vocab] / lora_embedding_B [hidden, r]) + lm_head (beyond vLLM)
  llama_save_embed_head  llama, r=4 alpha=8, v_proj, modules_to_save [embed_tokens, lm_head]: the
                    saved full copies perturbed by 0.05 * randn so they differ from the base
  smollm2_r8_qv     the real SmolLM2-135M-Instruct (~/.cache/vllm-rs/SmolLM2-135M-Instruct.Q4_1.gguf,
                    dequantised to a float32 Hugging Face folder under ~/.cache/vllm-rs/), r=8
                    alpha=16, q/v, weights 0.05 * randn stored as float16 (+ adapter.gguf, F32).
                    Its reference.json has no full logit rows: per prompt (token ids of English
                    sentences, no BOS) the base and adapted greedy continuations and the top-5
                    (token, logprob) of the last prompt position, base and adapted.
  mixtral_experts   mixtral (4 experts, 2 per token), r=4 alpha=8, q_proj and PEFT's
                    target_parameters [experts.gate_up_proj, experts.down_proj]: transformers 5
                    stores a mixture's experts fused ([experts, 2 * width, hidden] and [experts,
                    hidden, width]), so PEFT adapts them as parameters (lora.ParamWrapper):
                    lora_A [experts * r, in], lora_B [out, experts * r] (expert e's A rows
                    e*r..(e+1)*r, its B columns e, e + experts, ...), the second parameter's
                    wrapper nested as `experts.base_layer`
  qwen3_moe_experts qwen3_moe, r=4 alpha=8, o_proj and target_parameters [experts.down_proj]
  bert_r4           the tiny BERT embedder (fixtures/embedding/bert, written by
                    make_model_fixtures.py), task FEATURE_EXTRACTION, r=4 alpha=8, target_modules
                    [query, key, value, dense, word_embeddings]: every linear layer (the pooler's
                    dense too, which sentence-transformers' pooling never runs) and the word
                    embeddings (lora_embedding_A / _B). Its reference.json holds per text the
                    token ids and the pooled vector with the adapter ("embedding") and without it
                    ("base_embedding"): transformers' last hidden state in float32, mean over the
                    tokens, unit length (sentence-transformers' Pooling + Normalize).
  bad_rank_64 bad_target_missing bad_shape bad_nan bad_bin_only bad_not_safetensors: broken
                    adapters on llama that loading must reject (no reference).

adapter.gguf is written by llama.cpp's convert_lora_to_gguf.py (--outtype f32, --base <base HF
folder>) taken from the llama-cpp-python sdist (downloaded with pip into /tmp/llamacpp when
LLAMA_CPP_DIR is not set) with that tree's own gguf-py.

Usage (torch, transformers, peft, safetensors, gguf are only needed here, never at run or test time):
    .cache/refvenv/bin/pip install torch transformers peft safetensors gguf
    .cache/refvenv/bin/python scripts/make_lora_fixtures.py [name ...]
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import peft
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = "fixtures/lora"  # relative to ROOT (the script chdirs there)
PROMPTS = [[1, 17, 200, 3, 45, 99, 120, 7, 64, 31], [5, 250, 11], [42, 42, 8, 190, 77, 2]]
NEW_TOKENS = 16
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_DIR = os.environ.get(
    "LLAMA_CPP_DIR", f"/tmp/llamacpp/llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp")

CACHE = os.path.expanduser("~/.cache/vllm-rs")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_HF = os.path.join(CACHE, "SmolLM2-135M-Instruct-f32-hf")  # float32 conversion, not committed
SMOL_TEXTS = ["The capital of France is", "def fibonacci(n):",
              "Once upon a time, there was a little", "The three primary colors are"]

# name: (base fixture, seed, LoraConfig kwargs, write adapter.gguf)
ADAPTERS = {
    "llama_r8_qv": ("fixtures/models/llama", 1,
                    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), True),
    "llama_r4_all": ("fixtures/models/llama", 2, dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR), False),
    "llama_rslora_r16": ("fixtures/models/llama", 3,
                         dict(r=16, lora_alpha=32, use_rslora=True,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), False),
    "llama_patterns": ("fixtures/models/llama", 4,
                       dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 4},
                            layers_to_transform=[1]), False),
    "qwen2_r8": ("fixtures/models/qwen2", 5,
                 dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), False),
    "phi3_r8": ("fixtures/models/phi3", 6,
                dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                False),
    "gpt2_r8": ("fixtures/models/gpt2", 7,
                dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                False),
    "llama_r8_qv_b": ("fixtures/models/llama", 8,
                      dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]), False),
    "qwen2_embed_head": ("fixtures/models/qwen2", 12,
                         dict(r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens", "lm_head"]), False),
    "llama_save_embed_head": ("fixtures/models/llama", 13,
                              dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                   modules_to_save=["embed_tokens", "lm_head"]), False),
    "mixtral_experts": ("fixtures/models/mixtral", 15,
                        dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]), False),
    "qwen3_moe_experts": ("fixtures/models/qwen3_moe", 16,
                          dict(r=4, lora_alpha=8, target_modules=["o_proj"],
                               target_parameters=["experts.down_proj"]), False),
}
BAD = ["bad_rank_64", "bad_target_missing", "bad_shape", "bad_nan", "bad_bin_only", "bad_not_safetensors"]
ALL = list(ADAPTERS) + ["smollm2_r8_qv", "bert_r4"] + BAD


def load_base(path):
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model


def randomize_lora(pm, seed, std):
    """Overwrite every lora_A / lora_B (and lora_embedding_A / _B) with std * randn from a generator
    seeded with `seed`; add 0.05 * randn to every modules_to_save copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if ".lora_A." in n or ".lora_B." in n or ".lora_embedding_" in n:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32))
            elif ".modules_to_save." in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32))


def save_adapter(pm, d, base_name):
    if os.path.isdir(d):
        shutil.rmtree(d)
    pm.save_pretrained(d, safe_serialization=True)
    readme = os.path.join(d, "README.md")  # PEFT's model card template: not needed
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(d, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base_name
    if isinstance(cfg.get("target_modules"), list):  # a set inside PEFT: make the order stable
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def scales(pm):
    """Effective scale (alpha/r, or alpha/sqrt(r) with rsLoRA) of every adapted module."""
    out = {}
    for n, mod in pm.named_modules():
        s = getattr(mod, "scaling", None)
        if isinstance(s, dict) and "default" in s:
            out[n.replace("base_model.model.", "", 1)] = s["default"]
    return out


def generate(model, ids):
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def make_adapter(name, base, seed, kw, std=0.1):
    torch.manual_seed(seed)
    pm = get_peft_model(load_base(base), LoraConfig(task_type="CAUSAL_LM", **kw))
    randomize_lora(pm, seed, std)
    d = os.path.join(OUT, name)
    save_adapter(pm, d, base)
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert sd and all(t.abs().sum() > 0 for t in sd.values()), "adapter has all-zero tensors"
    return pm, d


def write_reference(name, base, seed, kw):
    pm, d = make_adapter(name, base, seed, kw)
    # Reference from the adapter as read back from disk, on a fresh base.
    plain = load_base(base)
    with torch.no_grad():
        base_greedy = [generate(plain, ids) for ids in PROMPTS]
    model = PeftModel.from_pretrained(load_base(base), d).eval()
    cases = []
    with torch.no_grad():
        for ids, bg in zip(PROMPTS, base_greedy):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0]
            mem = pm(input_ids=x).logits[0]
            assert torch.allclose(logits, mem, atol=1e-5), "saved adapter differs from the in-memory one"
            cases.append({
                "prompt": ids,
                "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                "greedy": generate(model, ids),
                "base_greedy": bg,
            })
    cfg = model.peft_config["default"]
    ref = {
        "architecture": plain.config.architectures[0], "transformers": tf.__version__,
        "torch": torch.__version__, "peft": peft.__version__, "base": base,
        "adapter": {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                    "use_rslora": cfg.use_rslora, "rank_pattern": cfg.rank_pattern,
                    "alpha_pattern": cfg.alpha_pattern, "layers_to_transform": cfg.layers_to_transform,
                    "fan_in_fan_out": cfg.fan_in_fan_out, "scales": scales(model)},
        "cases": cases,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    changed = sum(c["greedy"] != c["base_greedy"] for c in cases)
    return d, f"greedy {cases[0]['greedy']}, {changed}/{len(cases)} continuations differ from the base"


# ---------------------------------------------------------------- an embedding model (BERT)

BERT_BASE = "fixtures/embedding/bert"


def write_bert(name="bert_r4", seed=14):
    from tokenizers import Tokenizer
    base_ref = json.load(open(os.path.join(BERT_BASE, "reference.json")))
    tok = Tokenizer.from_file(os.path.join(BERT_BASE, "tokenizer.json"))

    def pooled(model, ids):  # mean over the tokens, unit length (float32)
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return torch.nn.functional.normalize(h.mean(0), dim=0)

    def load():
        return tf.AutoModel.from_pretrained(BERT_BASE, dtype=torch.float32).eval()

    torch.manual_seed(seed)
    kw = dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense", "word_embeddings"])
    pm = get_peft_model(load(), LoraConfig(task_type="FEATURE_EXTRACTION", **kw))
    randomize_lora(pm, seed, 0.2)
    d = os.path.join(OUT, name)
    save_adapter(pm, d, BERT_BASE)
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert sd and all(t.abs().sum() > 0 for t in sd.values()), "adapter has all-zero tensors"
    model = PeftModel.from_pretrained(load(), d).eval()
    plain = load()
    cases = []
    with torch.no_grad():
        for c in base_ref["cases"]:
            ids = tok.encode(c["text"]).ids
            assert ids == c["prompt"], (ids, c["prompt"])
            adapted, base = pooled(model, ids), pooled(plain, ids)
            assert torch.allclose(base, torch.tensor(c["embedding"]), atol=1e-6), "base differs from its fixture"
            assert torch.allclose(adapted, pooled(pm, ids), atol=1e-5), "saved adapter differs from the in-memory one"
            cases.append({"text": c["text"], "prompt": ids,
                          "embedding": [round(v, 7) for v in adapted.tolist()],
                          "base_embedding": [round(v, 7) for v in base.tolist()]})
    cfg = model.peft_config["default"]
    ref = {
        "architecture": "BertModel", "transformers": tf.__version__, "torch": torch.__version__,
        "peft": peft.__version__, "base": BERT_BASE, "pooling": "mean, normalize",
        "adapter": {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
                    "use_rslora": cfg.use_rslora, "scales": scales(model)},
        "cases": cases,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    cos = min(float(torch.dot(torch.tensor(c["embedding"]), torch.tensor(c["base_embedding"]))) for c in cases)
    return d, f"{len(sd)} tensors, lowest cosine between adapted and base vectors {cos:.4f}"


# ---------------------------------------------------------------- bad adapters

def write_bad(name):
    base = "fixtures/models/llama"
    d = os.path.join(OUT, name)
    if name == "bad_rank_64":
        make_adapter(name, base, 64, dict(r=64, lora_alpha=128, target_modules=["q_proj"]))
        return d, "r=64 on q_proj"
    # The others start from a valid r=8 q_proj adapter and break it.
    _, d = make_adapter(name, base, 9, dict(r=8, lora_alpha=16, target_modules=["q_proj"]))
    st = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(st)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    if name == "bad_target_missing":
        sd = {k.replace("model.layers.0.", "model.layers.7.").replace("model.layers.1.", "model.layers.7."): v
              for k, v in sd.items() if "layers.1." not in k}
        save_file(sd, st, metadata={"format": "pt"})
        return d, f"keys {sorted(sd)}"
    if name == "bad_shape":
        g = torch.Generator().manual_seed(10)
        sd[key.format("B")] = 0.1 * torch.randn(48, 8, generator=g)  # q_proj out is 64
        save_file(sd, st, metadata={"format": "pt"})
        return d, f"{key.format('B')} {tuple(sd[key.format('B')].shape)} (q_proj out is 64)"
    if name == "bad_nan":
        sd[key.format("A")][3, 5] = float("nan")
        save_file(sd, st, metadata={"format": "pt"})
        return d, f"{key.format('A')}[3, 5] = NaN"
    if name == "bad_bin_only":
        os.remove(st)
        torch.save(sd, os.path.join(d, "adapter_model.bin"))
        return d, "adapter_model.bin only"
    if name == "bad_not_safetensors":
        with open(st, "wb") as f:
            f.write(np.random.default_rng(11).integers(0, 256, 300, dtype=np.uint8).tobytes())
        return d, "300 random bytes as adapter_model.safetensors"
    raise ValueError(name)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct

def smol_base():
    """Float32 Hugging Face folder of the default model, dequantised from its Q4_1 GGUF (cached)."""
    if not os.path.exists(os.path.join(SMOL_HF, "model.safetensors")):
        model = tf.AutoModelForCausalLM.from_pretrained(CACHE, gguf_file=SMOL_GGUF, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(CACHE, gguf_file=SMOL_GGUF)
        # The GGUF loader leaves a gguf "quantizer" attached that refuses save_pretrained: copy the
        # (already dequantised) float32 weights into a plain model built from the config.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        plain.save_pretrained(SMOL_HF, safe_serialization=True)
        tok.save_pretrained(SMOL_HF)
    return SMOL_HF


def top5(logits):
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    v, i = lp.topk(5)
    return [[int(t), round(float(p), 6)] for t, p in zip(i, v)]


def write_smollm2(name="smollm2_r8_qv", seed=12, std=0.05):
    base = smol_base()
    tok = tf.AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(load_base(base), LoraConfig(task_type="CAUSAL_LM", **kw))
    randomize_lora(pm, seed, std)
    d = os.path.join(OUT, name)
    save_adapter(pm, d, "HuggingFaceTB/SmolLM2-135M-Instruct")
    del pm
    # Stored as float16 (half the bytes; the reference below uses the rounded values).
    st = os.path.join(d, "adapter_model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in load_file(st).items()}, st, metadata={"format": "pt"})
    model = PeftModel.from_pretrained(load_base(base), d).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    cases = []
    with torch.no_grad():
        for text in SMOL_TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            adapted = model(input_ids=x).logits[0, -1]
            greedy = generate(model, ids)
            with model.disable_adapter():
                plain = model(input_ids=x).logits[0, -1]
                base_greedy = generate(model, ids)
            cases.append({"text": text, "prompt": ids, "greedy": greedy, "base_greedy": base_greedy,
                          "top5": top5(adapted), "base_top5": top5(plain),
                          "greedy_text": tok.decode(greedy), "base_greedy_text": tok.decode(base_greedy)})
    ref = {
        "architecture": model.base_model.model.config.architectures[0], "transformers": tf.__version__,
        "torch": torch.__version__, "peft": peft.__version__,
        "base": f"~/.cache/vllm-rs/{SMOL_GGUF}",
        "base_note": "reference computed on the Q4_1 GGUF weights dequantised to float32 by transformers",
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
                    "dtype": "float16", "init": f"{std} * randn, seed {seed}", "scales": {"*": 2.0}},
        "cases": cases,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    changed = sum(c["greedy"] != c["base_greedy"] for c in cases)
    return d, f"{changed}/{len(cases)} continuations differ; e.g. {cases[0]['base_greedy_text']!r} -> " \
              f"{cases[0]['greedy_text']!r}"


# ---------------------------------------------------------------- GGUF adapters (llama.cpp)

def llama_cpp_dir():
    if not os.path.exists(os.path.join(LLAMA_CPP_DIR, "convert_lora_to_gguf.py")):
        dl = "/tmp/llamacpp"
        os.makedirs(dl, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", dl], check=True)
        with tarfile.open(glob.glob(f"{dl}/llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz")[0]) as t:
            t.extractall(dl)
    return LLAMA_CPP_DIR


def write_gguf(d, base):
    src = llama_cpp_dir()
    out = os.path.join(d, "adapter.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    env.pop("NO_LOCAL_GGUF", None)
    subprocess.run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), "--outtype", "f32",
                    "--base", base, "--outfile", out, d], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def describe_gguf(path):
    sys.path.insert(0, os.path.join(llama_cpp_dir(), "gguf-py"))
    import gguf
    r = gguf.GGUFReader(path)
    lines = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents() if hasattr(f, "contents") else f.parts[-1].tolist()
        lines.append(f"  {k} = {v!r}")
    for t in r.tensors[:6]:
        lines.append(f"  {t.name} {t.tensor_type.name} shape(ne)={list(map(int, t.shape))}")
    lines.append(f"  ... {len(r.tensors)} tensors")
    return "\n".join(lines)


def size_of(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def main():
    os.chdir(ROOT)
    only = sys.argv[1:]
    for name in only:
        if name not in ALL:
            sys.exit(f"unknown fixture {name}; known: {' '.join(ALL)}")
    for name in ALL:
        if only and name not in only:
            continue
        if name in ADAPTERS:
            base, seed, kw, gg = ADAPTERS[name]
            d, note = write_reference(name, base, seed, kw)
            if gg:
                p = write_gguf(d, base)
                note += "\n" + describe_gguf(p)
        elif name == "bert_r4":
            d, note = write_bert(name)
        elif name == "smollm2_r8_qv":
            d, note = write_smollm2(name)
            p = write_gguf(d, SMOL_HF)
            note += "\n" + describe_gguf(p)
        else:
            d, note = write_bad(name)
        print(f"{name}: {size_of(d)} bytes, {note}", flush=True)
    print(f"fixtures/lora: {sum(size_of(os.path.join(OUT, n)) for n in os.listdir(OUT))} bytes")


if __name__ == "__main__":
    main()
