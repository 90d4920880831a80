#!/usr/bin/env python3
"""Convert the tiny model fixtures to GGUF with llama.cpp's own converter and quantizer, and
measure llama.cpp's error on each file.

For every folder of scripts/make_model_fixtures.py that llama.cpp converts (all but OPT),
llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python sdist) writes

    fixtures/models/<name>/model.f32.gguf     --outtype f32
    fixtures/models/<name>/model.q8_0.gguf    --outtype q8_0
    fixtures/models/<name>/model.q4_k_m.gguf  llama.cpp's quantizer (llama_model_quantize), Q4_K_M

and llama.cpp itself (the llama-cpp-python binding, all logits) runs each file on the fixture
prompts; its logit error against transformers' reference (per row the largest difference
relative to the row's largest logit, as crates/models/tests/gguf_architectures.rs measures
ours; the largest and the mean over rows) goes to fixtures/models/<name>/gguf.json.

The fixtures are 64 wide: k-quants need rows of 256, so llama.cpp's Q4_K_M falls back to
Q5_0/Q5_1/Q8_0 for most tensors here (gguf.json lists each file's tensor types).

The fixtures have no tokenizer (their tests run on token ids), so the converter's vocabulary
step is replaced by a byte-level vocabulary (GGUF `gpt2` model: 255 byte symbols and one
merge of two spaces): every file is a complete GGUF that llama.cpp and the engine load with
its tokenizer. Everything
else (metadata, tensor names, Q/K permutation, Gemma's norm shift, expert stacking) is the
converter's own.

Usage:
    .cache/refvenv/bin/pip install torch transformers gguf numpy llama-cpp-python==0.3.36
    .cache/refvenv/bin/python scripts/make_gguf_fixtures.py <llama.cpp source dir> [name ...]
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "models")
NAMES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "mixtral", "qwen3_moe"]


def bytes_to_unicode():
    """GPT-2's byte-to-symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_vocab(self):
    table = bytes_to_unicode()
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    # llama.cpp wants at least one merge: two spaces merge into the last token (so byte 0xFF,
    # whose symbol it replaces, cannot be written).
    tokens = [table[b] for b in range(255)] + [table[32] * 2]
    w.add_token_list(tokens)
    w.add_token_types([1] * 256)
    w.add_token_merges([f"{table[32]} {table[32]}"])


def convert(llama_cpp_dir, src, out, outtype):
    sys.path.insert(0, llama_cpp_dir)
    sys.path.insert(1, os.path.join(llama_cpp_dir, "gguf-py"))
    import convert_hf_to_gguf as conv

    if not getattr(conv, "_fixture_patched", False):
        original = conv.get_model_class

        def patched(*args, **kwargs):
            cls = original(*args, **kwargs)
            return type(cls.__name__, (cls,), {"set_vocab": byte_vocab, "model_arch": cls.model_arch})

        conv.get_model_class = patched
        conv._fixture_patched = True
    # A copy of the checkpoint with a stub tokenizer.json (Gemma 3's converter counts the
    # vocabulary from it to trim the embedding rows).
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(src, "model.safetensors"), tmp)
        config = json.load(open(os.path.join(src, "config.json")))
        if config.get("model_type") == "gpt2":  # real GPT-2 configs carry n_ctx; the converter reads it
            config.setdefault("n_ctx", config["n_positions"])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f)
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            table = bytes_to_unicode()
            json.dump({"model": {"vocab": {table[b]: b for b in range(256)}}, "added_tokens": []}, f)
        sys.argv = ["convert_hf_to_gguf.py", tmp, "--outfile", out, "--outtype", outtype]
        conv.main()


def quantize(src, out, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    assert rc == 0, f"quantize {src} -> {out}: {rc}"


def tensor_types(path):
    import gguf

    r = gguf.GGUFReader(path)
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(np.prod(t.shape))
    return dict(sorted(counts.items()))


def llama_cpp_error(path, cases):
    """llama.cpp's relative logit error over every prompt position: per row the largest
    absolute difference over the row's largest absolute logit; the largest and the mean."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    rows = []
    for c in cases:
        llm.reset()
        llm.eval(c["prompt"])
        got = np.array(llm.scores[: len(c["prompt"])], dtype=np.float64)
        want = np.array(c["logits"], dtype=np.float64)
        scale = np.maximum(np.abs(want).max(axis=1), 1e-6)
        rows.extend((np.abs(got - want).max(axis=1) / scale).tolist())
    llm.close()
    return max(rows), sum(rows) / len(rows)


def main():
    llama_cpp_dir = sys.argv[1]
    names = sys.argv[2:] or NAMES
    import llama_cpp

    for name in names:
        d = os.path.join(ROOT, name)
        ref = json.load(open(os.path.join(d, "reference.json")))
        files = {
            "f32": os.path.join(d, "model.f32.gguf"),
            "q8_0": os.path.join(d, "model.q8_0.gguf"),
            "q4_k_m": os.path.join(d, "model.q4_k_m.gguf"),
        }
        convert(llama_cpp_dir, d, files["f32"], "f32")
        convert(llama_cpp_dir, d, files["q8_0"], "q8_0")
        quantize(files["f32"], files["q4_k_m"], llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
        report = {}
        for kind, path in files.items():
            worst, mean = llama_cpp_error(path, ref["cases"])
            report[kind] = {
                "bytes": os.path.getsize(path),
                "tensor_types": tensor_types(path),
                "llama_cpp_max_logit_error": worst,
                "llama_cpp_mean_logit_error": mean,
            }
            print(f"{name} {kind}: {report[kind]}")
        report["llama_cpp_python"] = llama_cpp.__version__
        with open(os.path.join(d, "gguf.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
