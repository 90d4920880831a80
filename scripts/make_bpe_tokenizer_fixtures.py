#!/usr/bin/env python3
"""Byte-level BPE tokenizer fixtures, one per GGUF pre-tokenizer name we rebuild.

For each name a byte-level BPE is trained with the `tokenizers` package behind the
pre-tokenizer that the models using that name ship in their tokenizer.json (the patterns are
the ones llama.cpp's llama-vocab.cpp quotes as "original regex from tokenizer.json"), saved
as tokenizer.json, and written into a GGUF by llama.cpp's converter (`--vocab-only`; the
converter recognises real tokenizers by hashing their output, which a tokenizer trained here
cannot match, so its pre-tokenizer lookup is told the name). Then, per text:

    fixtures/tokenizers/bpe_<name>.gguf   the converter's GGUF
    fixtures/tokenizers/bpe_<name>.json   transformers' ids (the tokenizer.json) and llama.cpp's
                                          ids on the GGUF (llama-cpp-python), for TEXTS

crates/tokenizer/tests/gguf_tokenizers.rs checks ours against both.

Usage:
    .cache/refvenv/bin/python scripts/make_bpe_tokenizer_fixtures.py <llama.cpp source dir>
"""
import json
import os
import sys
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenizer_fixtures import CORPUS, TEXTS  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tokenizers")

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
GPT4O = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DEEPSEEK_LLM = [
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
]
DEEPSEEK_CODER = [
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
]
DEEPSEEK_V3 = [
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]


def splits(patterns):
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


VARIANTS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: splits([LLAMA3]),
    "qwen2": lambda: splits([QWEN2]),
    "deepseek-llm": lambda: splits(DEEPSEEK_LLM),
    "deepseek-coder": lambda: splits(DEEPSEEK_CODER),
    "deepseek-v3": lambda: splits(DEEPSEEK_V3),
    "tekken": lambda: splits([TEKKEN]),
    "gpt-4o": lambda: splits([GPT4O]),
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def main():
    llama_cpp_dir = sys.argv[1]
    sys.path.insert(0, llama_cpp_dir)
    sys.path.insert(1, os.path.join(llama_cpp_dir, "gguf-py"))
    import convert_hf_to_gguf as conv
    from conversion import base as conversion_base
    import transformers as tf

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: llama.cpp's ids are left out")
    os.makedirs(OUT, exist_ok=True)
    for name, make_pre in VARIANTS.items():
        tok = Tokenizer(models.BPE(ignore_merges=name == "llama-bpe"))
        tok.pre_tokenizer = make_pre()
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS.splitlines() * 20, trainer)
        with tempfile.TemporaryDirectory() as d:
            tok.save(os.path.join(d, "tokenizer.json"))
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                       "eos_token": "<|im_end|>", "add_bos_token": False}, open(os.path.join(d, "tokenizer_config.json"), "w"))
            json.dump({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                       "vocab_size": tok.get_vocab_size(), "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                       "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 2},
                      open(os.path.join(d, "config.json"), "w"))
            conversion_base.TextModel.get_vocab_base_pre = lambda self, tokenizer, _name=name: _name
            gguf_path = os.path.join(OUT, f"bpe_{name}.gguf")
            sys.argv = ["convert_hf_to_gguf.py", d, "--outfile", gguf_path, "--vocab-only"]
            conv.main()
            # The tokenizer.json itself (AutoTokenizer would pick Qwen2's class from config.json,
            # which brings its own pre-tokenizer).
            hf = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
            llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False) if llama_cpp else None
            cases = []
            for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "it's DON'T we'll 12,345.678"]:
                ids = hf(text, add_special_tokens=False).input_ids
                case = {"text": text, "hf": ids, "hf_decoded": hf.decode(ids)}
                if llm is not None:
                    case["llama_cpp"] = llm.tokenize(text.encode(), add_bos=False, special=True)
                cases.append(case)
            report = {"pre": name, "transformers": tf.__version__, "cases": cases}
            if llama_cpp:
                report["llama_cpp_python"] = llama_cpp.__version__
            with open(os.path.join(OUT, f"bpe_{name}.json"), "w") as f:
                json.dump(report, f, ensure_ascii=False, indent=1)
            agree = sum(c.get("llama_cpp") == c["hf"] for c in cases)
            print(f"{name}: {len(cases)} texts; llama.cpp equal to transformers on {agree}")


if __name__ == "__main__":
    main()
