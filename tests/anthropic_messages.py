"""The official `anthropic` client's Messages API against the server: text (`messages.create`
and `messages.stream`), a stop sequence, structured output, a tool loop (a forced `tool_use`, its `tool_result`,
the answer) whole and streamed, `count_tokens`, `x-api-key` and `Authorization: Bearer`, and
errors raised as the client's own exceptions. Run by crates/server/tests/agent_apis.rs; argv:
base URL, API key."""
import json
import sys

import anthropic

base, key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key=key)  # sends x-api-key
# Greedy sampling (this client version no longer has a `temperature` argument; the server still
# reads the field).
GREEDY = {"temperature": 0}
checks = 0

question = [{"role": "user", "content": "What is the capital of France?"}]
m = client.messages.create(model="smol", max_tokens=20, system="Answer briefly.", messages=question, extra_body=GREEDY)
assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
assert m.content[0].type == "text" and m.content[0].text, m
assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m
checks += 1

# count_tokens: the prompt create counted (Anthropic's input_tokens excludes cache reads).
n = client.messages.count_tokens(model="smol", system="Answer briefly.", messages=question)
assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0), (n, m.usage)
checks += 1

# A stop sequence.
s = client.messages.create(model="smol", max_tokens=40, extra_body=GREEDY, stop_sequences=["Paris"],
                           messages=[{"role": "user", "content": "Say: I love Paris in spring."}])
if s.stop_reason == "stop_sequence":
    assert s.stop_sequence == "Paris" and "Paris" not in s.content[0].text, s
checks += 1

# Structured output (output_config.format).
person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
j = client.messages.create(model="smol", max_tokens=60, messages=[{"role": "user", "content": "Invent a person."}],
                           output_config={"format": {"type": "json_schema", "schema": person}}, extra_body=GREEDY)
p = json.loads(j.content[0].text)
assert isinstance(p["name"], str) and isinstance(p["age"], int), p
checks += 1

# Streaming text: the client assembles the events into the same message.
with client.messages.stream(model="smol", max_tokens=20, messages=question, extra_body=GREEDY) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text and final.content[0].text == text and final.stop_reason in ("end_turn", "max_tokens"), final
assert final.usage.output_tokens > 0, final.usage
checks += 1

# A tool loop: the forced call's input is valid JSON of the tool's schema, then the answer.
tools = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
for choice in [{"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}]:
    t = client.messages.create(model="smol", max_tokens=60, tools=tools, tool_choice=choice, messages=ask,
                               extra_body=GREEDY)
    assert t.stop_reason == "tool_use", t
    (use,) = [b for b in t.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input["city"], str), use
    checks += 1
answer = client.messages.create(
    model="smol", max_tokens=30, tools=tools, extra_body=GREEDY,
    messages=ask + [{"role": "assistant", "content": t.content},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": "Sunny, 21 degrees"}]}])
assert answer.content[0].type == "text" and answer.content[0].text, answer
assert answer.stop_reason in ("end_turn", "max_tokens"), answer
checks += 1

# The tool call streamed (input_json_delta), assembled by the client.
with client.messages.stream(model="smol", max_tokens=60, tools=tools, tool_choice={"type": "any"}, messages=ask,
                            extra_body=GREEDY) as stream:
    kinds = [e.type for e in stream]
    final = stream.get_final_message()
assert "content_block_start" in kinds and "message_stop" in kinds, kinds
(use,) = [b for b in final.content if b.type == "tool_use"]
assert isinstance(use.input["city"], str) and final.stop_reason == "tool_use", final
checks += 1

# Authorization: Bearer works too; a wrong key and a bad request raise the client's errors.
bearer = anthropic.Anthropic(base_url=base, auth_token=key, api_key=None)
assert bearer.messages.create(model="smol", max_tokens=4, messages=question).content
try:
    anthropic.Anthropic(base_url=base, api_key="wrong").messages.create(model="smol", max_tokens=4,
                                                                        messages=question)
    raise AssertionError("a wrong key is refused")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
try:
    client.messages.create(model="smol", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    raise AssertionError("images are refused")
except anthropic.BadRequestError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
try:
    client.messages.create(model="not-served", max_tokens=4, messages=question)
    raise AssertionError("an unknown model is refused")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
checks += 1
print(f"anthropic client messages: {checks} passed")
