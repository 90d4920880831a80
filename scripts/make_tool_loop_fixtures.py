#!/usr/bin/env python3
"""Write fixtures/tool_loop.json: agent-style conversations as vLLM normalises and renders them.

For each chat template (the four of fixtures/chat_templates.json, plus tool-capable templates
of both content formats from llama.cpp's `models/templates` in the llama-cpp-python 0.3.36
sdist), vLLM 0.32's own code decides the content format (`_detect_content_format`) and turns
the wire messages into the template's messages (`parse_chat_messages`, which ends with
`_postprocess_messages`); transformers' `render_jinja_template` renders them, as vLLM's
`apply_chat_template` does. Cases: the tool loop as agent frameworks send it back (assistant
`content: null`, `arguments` as a JSON string, the `tool` result), the same with content-part
lists, and the loop rendered with the other content format forced
(`--chat-template-content-format`). Also vLLM's detection on small synthetic templates.
The Rust tests (crates/tokenizer/tests/tool_loop.rs) need neither Python nor vLLM.

Usage (the vLLM CPU venv of shared/PEERS.md):
    .cache/vllm-venv/bin/python scripts/make_tool_loop_fixtures.py LLAMA_CPP_TEMPLATES_DIR
"""
import copy
import json
import os
import sys
import types

from transformers.utils.chat_template_utils import render_jinja_template
from vllm.renderers.chat_utils import parse_chat_messages
from vllm.renderers.hf import _detect_content_format

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# llama.cpp templates added to the four of chat_templates.json: tool-capable, both formats.
EXTRA = {
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "qwen3-coder": "Qwen3-Coder.jinja",
    "hermes-3": "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
    "llama-3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "deepseek-v3.1": "deepseek-ai-DeepSeek-V3.1.jinja",
    "smollm3": "HuggingFaceTB-SmolLM3-3B.jinja",
    "mistral-small-3.2": "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "devstral-small": "unsloth-mistral-Devstral-Small-2507.jinja",
    "granite-4.0": "ibm-granite-granite-4.0.jinja",
    "kimi-k2": "moonshotai-Kimi-K2.jinja",
    "glm-4.6": "GLM-4.6.jinja",
    "qwen3.5": "Qwen3.5-4B.jinja",
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# As the openai client's `model_dump` of the returned assistant message sends it back.
CALL = {"id": "call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}
LOOP = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None, "audio": None,
     "function_call": None, "annotations": None},
    {"role": "tool", "tool_call_id": "call12345", "content": "{\"temperature\": 21}"},
]
# A malformed call in the history (arguments that are not a JSON object).
MALFORMED = [LOOP[1], {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "}},
    {"id": "call67890", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "error: bad arguments"},
    {"role": "tool", "tool_call_id": "call67890", "content": "error: bad arguments"}]
PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "text", "text": "What is the weather"}, {"type": "text", "text": "in Paris?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}], "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
     "content": [{"type": "text", "text": "{\"temperature\": 21}"}, {"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": "It is 21 degrees and sunny."},
    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]},
]

# Synthetic templates for the detection alone.
DETECTION = [
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}",
    "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}",
    "{% set msgs = messages[1:] %}{% for m in msgs|reverse %}{% for p in m.content|list %}x{% endfor %}{% endfor %}",
    "{% set a = messages %}{% set b = a %}{% for m in b %}{% for p in m.content %}x{% endfor %}{% endfor %}",
    "{% for m in messages %}{% set content = m.content %}{% for p in content %}x{% endfor %}{% endfor %}",
    "{% macro r(c) %}{% for p in c %}x{% endfor %}{% endmacro %}{% for m in messages %}{{ r(m.content) }}{% endfor %}",
    "{% macro r(c) %}{% for p in c %}x{% endfor %}{% endmacro %}{% for m in messages %}{{ r(c=m['content']) }}{% endfor %}",
    "{% macro r(c, d) %}{% for p in d %}x{% endfor %}{% endmacro %}{% for m in messages %}{{ r(m.content, [1]) }}{% endfor %}",
    "{% macro r(content) %}{% for p in content %}x{% endfor %}{% endmacro %}{{ r([]) }}",
    "{% for t in tools %}{% for p in t.content %}x{% endfor %}{% endfor %}",
    "{% for a, b in messages|batch(2) %}{% for p in a.content %}x{% endfor %}{% endfor %}",
    "{% for m in messages if m.role != 'system' %}{% for p in m.content %}x{% endfor %}{% endfor %}",
    "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}{% endfor %}",
    "{{ messages[0].content }}",
    "{% for m in messages %",
]

FAKE_MODEL_CONFIG = types.SimpleNamespace(enable_prompt_embeds=False, multimodal_config=None)


def normalise(messages, content_format):
    conversation, _, _ = parse_chat_messages(copy.deepcopy(messages), FAKE_MODEL_CONFIG, content_format)
    return conversation


def main():
    tdir = sys.argv[1]
    with open(os.path.join(ROOT, "fixtures", "chat_templates.json")) as fh:
        base = json.load(fh)
    meta = base["meta"]
    sources = dict(base["sources"])
    for name, file in EXTRA.items():
        with open(os.path.join(tdir, file)) as fh:
            sources[name] = fh.read()
    formats = {name: _detect_content_format(src, default="string") for name, src in sources.items()}
    cases = []
    for name, src in sources.items():
        detected = formats[name]
        other = "openai" if detected == "string" else "string"
        for cname, msgs, fmt in [("tool-loop", LOOP, detected), ("content-parts", PARTS, detected),
                                 ("malformed-arguments", MALFORMED, detected),
                                 ("tool-loop-forced-" + other, LOOP, other)]:
            case = {"template": name, "case": cname, "content_format": fmt, "messages": msgs, "tools": TOOLS,
                    "add_generation_prompt": True}
            try:
                conv = normalise(msgs, fmt)
                case["normalized"] = conv
                case["text"] = render_jinja_template(
                    conversations=[conv], tools=TOOLS, chat_template=src, add_generation_prompt=True,
                    bos_token=meta["bos_token"], eos_token=meta["eos_token"])[0][0]
            except Exception as e:  # the template refused the conversation
                case["error"] = f"{type(e).__name__}: {e}"
            cases.append(case)
            print(name, detected, cname, "->", repr(case.get("text", case.get("error")))[:100], flush=True)
    detection = [{"source": s, "format": _detect_content_format(s, default="string")} for s in DETECTION]
    out = {
        "meta": {"reference": f"vllm {__import__('vllm').__version__}, transformers "
                              f"{__import__('transformers').__version__}",
                 "bos_token": meta["bos_token"], "eos_token": meta["eos_token"],
                 "templates": {**meta["templates"], **{k: f"llama-cpp-python 0.3.36 sdist, "
                                                           f"vendor/llama.cpp/models/templates/{v}"
                                                        for k, v in EXTRA.items()}}},
        "sources": sources, "formats": formats, "detection": detection, "cases": cases,
    }
    path = os.path.join(ROOT, "fixtures", "tool_loop.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, ensure_ascii=False)
    print("wrote", path)


if __name__ == "__main__":
    main()
