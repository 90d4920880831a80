"""The tool loop as agent frameworks run it, with the official `openai` client against a server
started with `--enable-auto-tool-choice --tool-call-parser hermes` on the default model: the
model calls a tool (forced into hermes' format with a one-choice `structured_outputs`, as a
135M model rarely calls one by itself), the client's own assistant message goes back as
`model_dump()` gives it (`content: None`, `tool_calls` with `arguments` as a JSON string, and
`refusal`, `audio`, ... as None), then the `tool` result, and the model answers in text. Run
by crates/server/tests/tools.rs; argv: base URL, API key."""
import json
import sys

from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key)
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

first = client.chat.completions.create(model="smol", messages=messages, tools=tools, max_tokens=100,
                                       extra_body={"structured_outputs": {"choice": [call]}})
msg = first.choices[0].message
assert first.choices[0].finish_reason == "tool_calls", first
assert msg.content is None and len(msg.tool_calls) == 1, msg
assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}, msg

sent = msg.model_dump()
assert sent["content"] is None and isinstance(sent["tool_calls"][0]["function"]["arguments"], str), sent
messages += [sent, {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": json.dumps({"temperature": 21})}]
for stream in (False, True):
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smol", messages=messages, tools=tools, max_tokens=20, temperature=0, stream=True) if c.choices)
    else:
        second = client.chat.completions.create(model="smol", messages=messages, tools=tools, max_tokens=20,
                                                temperature=0)
        text = second.choices[0].message.content
    assert text and text.strip(), text
print("openai client tool loop: 2 passed")
