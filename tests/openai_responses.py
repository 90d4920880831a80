"""The official `openai` client's Responses API against the server: plain, instructions,
retrieval, `previous_response_id`, forced function calls (`required` and named, their arguments
valid JSON of the tool's schema), a tool loop (by `previous_response_id` and by sending the items
back), structured output, streaming (raw events and the client's `responses.stream` helper),
background runs polled, cancelled and deleted. Run by crates/server/tests/agent_apis.rs;
argv: base URL, API key."""
import json
import sys
import time

from openai import BadRequestError, NotFoundError, OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key)
checks = 0

# Plain, with instructions; stored and retrievable.
r = client.responses.create(model="smol", instructions="Answer briefly.", input="What is the capital of France?",
                            max_output_tokens=16, temperature=0)
assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete"), r
assert r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant", r
assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 16, r.usage
assert r.instructions == "Answer briefly." and r.max_output_tokens == 16, r
got = client.responses.retrieve(r.id)
assert got.id == r.id and got.output_text == r.output_text, got
checks += 1

# previous_response_id: the earlier turn (its input and output) is in the new prompt.
r2 = client.responses.create(model="smol", previous_response_id=r.id, input="And of Italy?", max_output_tokens=8,
                             temperature=0)
assert r2.previous_response_id == r.id and r2.output_text, r2
assert r2.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens, (r.usage, r2.usage)
checks += 1

# Forced function calls: valid JSON arguments of the tool's schema.
weather = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
question = "What is the weather like in Paris today?"
for choice in ["required", {"type": "function", "name": "get_weather"}]:
    c = client.responses.create(model="smol", input=question, tools=[weather], tool_choice=choice,
                                parallel_tool_calls=False, max_output_tokens=60, temperature=0)
    calls = [o for o in c.output if o.type == "function_call"]
    assert c.status == "completed" and len(calls) == 1, c
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_"), call
    args = json.loads(call.arguments)
    assert list(args) == ["city"] and isinstance(args["city"], str), args
    checks += 1

# The tool loop, continued by previous_response_id ...
follow = client.responses.create(model="smol", previous_response_id=c.id, tools=[weather], tool_choice="none",
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "Sunny, 21 degrees"}],
                                 max_output_tokens=24, temperature=0)
assert follow.output_text and not [o for o in follow.output if o.type == "function_call"], follow
# ... and statelessly, the output items sent back as input (as agent frameworks do).
items = [{"role": "user", "content": question}] + [o.model_dump(exclude_none=True) for o in c.output]
items.append({"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees"})
stateless = client.responses.create(model="smol", input=items, tools=[weather], tool_choice="none", store=False,
                                    max_output_tokens=24, temperature=0)
assert stateless.output_text and stateless.store is False, stateless
try:
    client.responses.retrieve(stateless.id)
    raise AssertionError("store=False responses are not kept")
except NotFoundError:
    pass
checks += 1

# Structured output (text.format json_schema).
person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
s = client.responses.create(model="smol", input="Invent a person.", max_output_tokens=60, temperature=0,
                            text={"format": {"type": "json_schema", "name": "person", "schema": person,
                                             "strict": True}})
p = json.loads(s.output_text)
assert isinstance(p["name"], str) and isinstance(p["age"], int), p
checks += 1

# Streaming: the event sequence, numbered, whose deltas make the final response's text.
events = list(client.responses.create(model="smol", input="Count from one to five.", max_output_tokens=20,
                                      temperature=0, stream=True))
types = [e.type for e in events]
assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed", types
assert [e.sequence_number for e in events] == list(range(len(events))), types
for t in ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
          "response.output_text.done", "response.content_part.done", "response.output_item.done"]:
    assert t in types, (t, types)
final = events[-1].response
text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert text and text == final.output_text, (text, final)
assert client.responses.retrieve(final.id).output_text == text
checks += 1

# The client's stream helper, which assembles events into its own types (and parses strict
# tools' arguments).
with client.responses.stream(model="smol", input=question, tools=[weather], tool_choice="required",
                             parallel_tool_calls=False, max_output_tokens=60, temperature=0) as stream:
    kinds = [e.type for e in stream]
    final = stream.get_final_response()
assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds, kinds
(call,) = [o for o in final.output if o.type == "function_call"]
assert isinstance(call.parsed_arguments["city"], str), call
checks += 1

# Background: polled to completion; a long one cancelled; a synchronous one cannot be.
bg = client.responses.create(model="smol", input="Say hello.", background=True, max_output_tokens=8)
assert bg.status in ("queued", "in_progress") and bg.background, bg
deadline = time.time() + 60
while (cur := client.responses.retrieve(bg.id)).status in ("queued", "in_progress"):
    assert time.time() < deadline, cur
    time.sleep(0.1)
assert cur.status in ("completed", "incomplete") and cur.output_text, cur
long = client.responses.create(model="smol", input="Tell a very long story.", background=True,
                               max_output_tokens=400, extra_body={"ignore_eos": True})
cancelled = client.responses.cancel(long.id)
assert cancelled.status == "cancelled", cancelled
time.sleep(0.3)
assert client.responses.retrieve(long.id).status == "cancelled"
try:
    client.responses.cancel(r.id)
    raise AssertionError("a synchronous response cannot be cancelled")
except BadRequestError:
    pass
checks += 1

# Delete.
client.responses.delete(r2.id)
try:
    client.responses.retrieve(r2.id)
    raise AssertionError("deleted")
except NotFoundError:
    pass
checks += 1
print(f"openai client responses: {checks} passed")
