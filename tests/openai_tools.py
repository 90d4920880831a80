"""The official `openai` client against a server started with `--enable-auto-tool-choice
--tool-call-parser <name>`: the model is made to write `fixture` (that family's real call
format, forced with a one-choice `structured_outputs`), and the client's own types carry the
parsed call, streamed (deltas assembled as agent frameworks do: the name first, then the
arguments in several chunks as they are generated) and not. Run by
crates/server/tests/tools.rs; argv: base URL, API key, fixture."""
import json
import sys

from openai import OpenAI

base, key, fixture = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key)
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
kw = dict(model="smol", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
          tool_choice="auto", max_tokens=200, extra_body={"structured_outputs": {"choice": [fixture]}})

r = client.chat.completions.create(**kw)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
(call,) = choice.message.tool_calls
assert call.type == "function" and call.id and call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call

calls, finish, pieces = {}, None, 0
for chunk in client.chat.completions.create(stream=True, **kw):
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            if tc.index not in calls:  # the first delta: id, type and name, no arguments yet
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == "", tc
            else:
                assert tc.id is None and tc.function.name is None, tc
                pieces += 1
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = ch.finish_reason or finish
assert finish == "tool_calls", finish
assert list(calls) == [0] and calls[0]["id"] and calls[0]["name"] == "get_weather", calls
assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}, calls
assert calls[0]["arguments"] == call.function.arguments, (calls, call)
assert pieces > 1, f"the arguments came in {pieces} chunk(s)"
print("openai client tool calls: 2 passed")
