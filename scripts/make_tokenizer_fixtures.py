#!/usr/bin/env python3
"""SentencePiece tokenizer fixtures: a tokenizer trained here, written into a GGUF by
llama.cpp's converter, and the ids Hugging Face and llama.cpp give on tricky text.

Two SentencePiece BPE models (byte fallback, split digits, a user-defined `<tool>` and a
control `<ctrl>` piece) are trained with the `sentencepiece` package on a small mixed
corpus: `spm_llama` prepends a space like Llama 2, Mistral v0.1 and TinyLlama
(add_dummy_prefix), `spm_gemma` does not, like Gemma. For each:

    fixtures/tokenizers/<name>.gguf   llama.cpp's convert_hf_to_gguf.py --vocab-only
    fixtures/tokenizers/<name>.json   per text: the ids of transformers' tokenizer built from
                                      the same tokenizer.model (legacy Llama behaviour), and of
                                      llama.cpp's tokenizer on the GGUF (llama-cpp-python)

crates/tokenizer/tests/gguf_tokenizers.rs loads each GGUF and checks our ids against both.

Usage:
    .cache/refvenv/bin/python scripts/make_tokenizer_fixtures.py <llama.cpp source dir>
"""
import json
import os
import sys
import tempfile

import sentencepiece as spm

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tokenizers")

CORPUS = """The quick brown fox jumps over the lazy dog. Serving language models on the CPU is a matter of
memory bandwidth. Numbers like 12345 and 3.14159 appear in text; so do dates such as 2026-12-01.
Café, naïve, résumé, über, São Paulo, Zürich: accents matter. 日本語のテキストと中文文本。 Emoji: 🙂🚀🎉.
\tTabs\tand  double  spaces, and
newlines.
def main():
    print("hello world")
"""

TEXTS = [
    "Hello world",
    " Hello world",
    "   three leading spaces",
    "double  spaces   and triple",
    "trailing space ",
    "digits 1234567890 and 3.14",
    "日本語のテキスト",
    "中文文本和English混合",
    "emoji 🙂🚀 and 🎉!",
    "Café naïve résumé Zürich",
    "tabs\tand\ttabs",
    "new\nlines\n\nand\r\nCRLF",
    "a<tool>b",
    "before <tool> after",
    "<ctrl>start",
    "mid<ctrl>dle <ctrl> end",
    "unseen: ÆØÅ ß ŋ ʃ ∑ ∫ ≠",
    "",
    " ",
    "\n",
    "    def main():\n        return 42",
]


def train(prefix_space, path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20), model_prefix=path, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=prefix_space,
        user_defined_symbols=["<tool>"], control_symbols=["<ctrl>"], bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2)


def convert(llama_cpp_dir, model_dir, out):
    sys.path.insert(0, llama_cpp_dir)
    sys.path.insert(1, os.path.join(llama_cpp_dir, "gguf-py"))
    import convert_hf_to_gguf as conv

    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--vocab-only"]
    conv.main()


def main():
    llama_cpp_dir = sys.argv[1]
    import transformers as tf

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: llama.cpp's ids are left out")
    os.makedirs(OUT, exist_ok=True)
    for name, prefix_space in [("spm_llama", True), ("spm_gemma", False)]:
        with tempfile.TemporaryDirectory() as d:
            train(prefix_space, os.path.join(d, "tokenizer"))
            sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": sp.vocab_size(),
                       "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2},
                      open(os.path.join(d, "config.json"), "w"))
            json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": prefix_space,
                       "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                      open(os.path.join(d, "tokenizer_config.json"), "w"))
            hf = tf.AutoTokenizer.from_pretrained(d)
            # As a Hub repository has them: tokenizer_config.json with added_tokens_decoder (the
            # converter marks user-defined and control pieces from it).
            # (transformers 5 no longer writes it; written here as transformers 4 did.)
            hf.save_pretrained(d)
            cfg_path = os.path.join(d, "tokenizer_config.json")
            cfg = json.load(open(cfg_path))
            cfg["added_tokens_decoder"] = {
                str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": t.special}
                for i, t in hf.added_tokens_decoder.items()}
            json.dump(cfg, open(cfg_path, "w"))
            gguf_path = os.path.join(OUT, f"{name}.gguf")
            convert(llama_cpp_dir, d, gguf_path)
            cases = []
            llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False) if llama_cpp else None
            for text in TEXTS:
                ids = hf(text, add_special_tokens=False).input_ids
                case = {"text": text, "hf": ids, "hf_decoded": hf.decode(ids)}
                if llm is not None:
                    case["llama_cpp"] = llm.tokenize(text.encode(), add_bos=False, special=True)
                cases.append(case)
                print(name, repr(text), case)
            report = {"transformers": tf.__version__, "hf_tokenizer": json.loads(hf.backend_tokenizer.to_str())["normalizer"],
                      "cases": cases}
            if llama_cpp:
                report["llama_cpp_python"] = llama_cpp.__version__
            with open(os.path.join(OUT, f"{name}.json"), "w") as f:
                json.dump(report, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
