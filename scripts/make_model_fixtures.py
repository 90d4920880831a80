#!/usr/bin/env python3
"""Write tiny random checkpoints of every supported architecture with float32 references.

For each architecture a small model (2 layers, 64 wide, 4 query heads over 2 key/value heads
where the architecture has them, 256-token vocabulary) is built with a fixed seed by
`transformers`, saved with `save_pretrained` (config.json + model.safetensors) under
fixtures/models/<name>/, and its float32 logits for three prompts plus a 16-token greedy
continuation of each are written to fixtures/models/<name>/reference.json.
crates/models/tests/architectures.rs loads each folder through the paged batched path (all
prompts in one batch) and compares.

Weights are drawn with a larger spread than the default initializer (std 0.2 instead of 0.02)
so the logits are far from uniform and greedy continuations are not decided by rounding.
Windowed attention (Mistral, Gemma 2) uses an 8-token window so that it matters within the
prompts and continuations.

Mixtures of experts (Mixtral, Qwen3 MoE) have 4 experts with 2 per token; Gemma 3 has six
layers (five local, one global). `llama_hd64` and `qwen3_hd128` are 128 wide with two query
heads over one key/value head of size 64 and 128: head sizes the CUDA kernels are built for.

`bert` (written to fixtures/embedding/bert, apart from the generative fixtures that
`vllm-server gpu-check` runs) is a sentence-transformers folder around a tiny random `BertModel` (32 wide, 2 layers of
4 heads, 128-token WordPiece vocabulary written here as tokenizer.json, mean pooling +
normalize): the base of the embedding-model LoRA fixture (scripts/make_lora_fixtures.py). Its
reference.json holds, per text, the token ids and the pooled vector computed in float32 from
transformers' last hidden state (mean over the tokens, then unit length, as
sentence-transformers' Pooling + Normalize modules do).

Usage (torch is only needed here, never at run or test time):
    python3 -m venv .cache/refvenv && .cache/refvenv/bin/pip install torch transformers
    .cache/refvenv/bin/python scripts/make_model_fixtures.py [name ...]
"""
import json
import os
import sys

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")
PROMPTS = [[1, 17, 200, 3, 45, 99, 120, 7, 64, 31], [5, 250, 11], [42, 42, 8, 190, 77, 2]]
NEW_TOKENS = 16
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)

ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(COMMON, rope_theta=10000.0)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(COMMON, sliding_window=8, head_dim=16)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(COMMON, tie_word_embeddings=True)),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(COMMON, head_dim=16)),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(COMMON, pad_token_id=0)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                    tie_word_embeddings=True)),
    "opt": (tf.OPTConfig, tf.OPTForCausalLM,
            dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1)),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)),  # MLP 4 x 64, as llama.cpp assumes
    # Gemma 3: six layers so that the 5:1 local/global pattern (and both rotary bases) is
    # exercised as llama.cpp assumes it; the attention scale is head_dim^-1/2 as in the real
    # models below 27B.
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(COMMON, num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                    tie_word_embeddings=True)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    # Head sizes the GPU kernels are built for (the others use 16): the same model tests run on
    # CUDA with these (crates/kernels CUDA_HEAD_SIZES).
    "llama_hd64": (tf.LlamaConfig, tf.LlamaForCausalLM,
                   dict(COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, rope_theta=10000.0)),
    "qwen3_hd128": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                    dict(COMMON, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128)),
}


# The tiny BERT's vocabulary: specials, letters and their word-piece continuations, digits,
# punctuation and the words of BERT_TEXTS (128 tokens).
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = ["the", "cat", "sits", "outside", "man", "is", "playing", "guitar", "new", "movie", "awesome",
              "paris", "capital", "of", "france", "rust", "memory", "safety", "lora", "adapter", "embedding",
              "model", "vector", "sentence", "dog", "runs", "home", "and", "in", "on", "to", "with", "a"]
BERT_TEXTS = ["The cat sits outside.", "A man is playing guitar.", "The new movie is awesome!",
              "Paris is the capital of France.", "Rust gives memory safety.", "xyz"]


def bert_vocab():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = BERT_SPECIAL + list(".,!?'-") + [str(d) for d in range(10)] + letters + ["##" + c for c in letters]
    vocab += [w for w in BERT_WORDS if w not in vocab]
    return vocab


def bert_tokenizer(vocab):
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    return tok


def mean_normalized(model, ids):
    """sentence-transformers' mean Pooling + Normalize of one unpadded sequence, in float32."""
    h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(h.mean(0), dim=0)


def write_bert(name="bert"):
    vocab = bert_vocab()
    assert len(vocab) <= 128, len(vocab)
    vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    model = tf.BertModel(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "LayerNorm.weight" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    d = os.path.join(OUT, "..", "embedding", name)
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
    model.config.architectures = ["BertModel"]
    model.save_pretrained(d, safe_serialization=True)
    tok = bert_tokenizer(vocab)
    tok.save(os.path.join(d, "tokenizer.json"))
    files = {
        "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64,
                                  "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                  "unk_token": "[UNK]", "mask_token": "[MASK]"},
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}],
        "sentence_bert_config.json": {"max_seq_length": 64, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
                                  "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                  "pooling_mode_mean_sqrt_len_tokens": False},
    }
    for f, v in files.items():
        with open(os.path.join(d, f), "w") as out:
            json.dump(v, out, indent=2)
    cases = []
    with torch.no_grad():
        for text in BERT_TEXTS:
            ids = tok.encode(text).ids
            cases.append({"text": text, "prompt": ids,
                          "embedding": [round(v, 7) for v in mean_normalized(model, ids).tolist()]})
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"architecture": "BertModel", "transformers": tf.__version__, "torch": torch.__version__,
                   "pooling": "mean, normalize", "cases": cases}, f)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d, f)))
    print(f"{name}: BertModel, {sum(p.numel() for p in model.parameters())} parameters, {size} bytes,"
          f" ids of {BERT_TEXTS[0]!r}: {cases[0]['prompt']}")


def main():
    only = sys.argv[1:]  # names to (re)write; all when empty
    if not only or "bert" in only:
        write_bert()
    for name, (cfg_cls, model_cls, kw) in ARCHS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        cfg = cfg_cls(**kw)
        model = model_cls(cfg).to(torch.float32).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                is_norm = p.dim() == 1 and ("norm" in n or "ln_" in n) and not n.endswith("bias")
                if is_norm and not name.startswith("gemma"):  # Gemma scales by (1 + weight)
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.dim() == 1:
                    p.copy_(0.1 * torch.randn_like(p))
                elif name.startswith("gemma") and "embed_tokens" in n:  # scaled by sqrt(hidden) = 8
                    p.copy_(0.05 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        cases = []
        with torch.no_grad():
            for ids in PROMPTS:
                x = torch.tensor([ids])
                logits = model(x).logits[0]
                out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                                     eos_token_id=None, pad_token_id=0)
                cases.append({
                    "prompt": ids,
                    "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                    "greedy": out[0, len(ids):].tolist(),
                })
        arch = model.config.architectures[0]
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump({"architecture": arch, "transformers": tf.__version__, "torch": torch.__version__,
                       "cases": cases}, f)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{name}: {arch}, {sum(p.numel() for p in model.parameters())} parameters, {size} bytes,"
              f" greedy {cases[0]['greedy']}")


if __name__ == "__main__":
    main()
