"""Drive a running vllm-server with the official `openai` Python client.

Usage: python tests/openai_client.py BASE_URL API_KEY
Exits non-zero (with a message) on the first failed check; prints a summary line.
"""
import sys

import json
import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


models = client.models.list()
model = models.data[0].id
check(model == "smol", f"model id {model}")

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
check(c.choices[0].text.startswith(" Paris"), f"completion text {c.choices[0].text!r}")
check(c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length", "completion usage / finish")

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30)
check(chat.choices[0].message.content == "The capital of France is Paris.", f"chat {chat.choices[0].message.content!r}")
check(chat.choices[0].finish_reason == "stop", "chat finish_reason")

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
    max_tokens=30, stream=True, stream_options={"include_usage": True})
parts, usage = [], None
for chunk in stream:
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
    if chunk.usage:
        usage = chunk.usage
check("".join(parts) == "The capital of France is Paris.", f"streamed chat {''.join(parts)!r}")
check(usage is not None and usage.completion_tokens > 0, "stream usage chunk")

cstream = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True)
check("".join(ch.choices[0].text for ch in cstream) == c.choices[0].text, "streamed completion equals non-streamed")

seeded = [client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, seed=7, temperature=1.0).choices[0].text
          for _ in range(2)]
check(seeded[0] == seeded[1], "seeded completions repeat")

# n > 1: seeded samples, choice indices 0..n-1, usage counts every sample.
par = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, n=3, seed=5, temperature=1.0)
check([ch.index for ch in par.choices] == [0, 1, 2], f"n=3 choice indices {[ch.index for ch in par.choices]}")
check(par.usage.completion_tokens == 24, f"n=3 usage {par.usage}")
check(par.choices[0].text == client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, seed=5, temperature=1.0).choices[0].text,
    "sample 0 of a seeded n=3 request equals the single request with that seed")
two = client.completions.create(model=model, prompt=["Hello", "The sky is"], max_tokens=4, n=2, temperature=0)
check(len(two.choices) == 4 and sorted(ch.index for ch in two.choices) == [0, 1, 2, 3], "2 prompts x n=2")
check(two.choices[0].text == two.choices[1].text, "greedy samples agree")
best = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, n=1, best_of=3,
                                 temperature=1.0, seed=1)
check(len(best.choices) == 1, "best_of=3, n=1 returns one choice")

# Streaming n=2 chat: each choice index gets its own deltas and its own finish_reason.
texts, finished = {}, set()
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=10, n=2, temperature=0, stream=True):
    for ch in chunk.choices:
        texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        if ch.finish_reason:
            finished.add(ch.index)
check(sorted(texts) == [0, 1] and finished == {0, 1} and texts[0] == texts[1] != "", f"streamed n=2 chat {texts}")

# Log probabilities, completions format.
lp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=3)
l = lp.choices[0].logprobs
check(len(l.tokens) == 3 and len(l.token_logprobs) == 3 and len(l.top_logprobs) == 3, f"completion logprobs {l}")
check("".join(l.tokens) == lp.choices[0].text, "logprob tokens spell the text")
check(all(t <= 0 for t in l.token_logprobs), "log probabilities are <= 0")
check(all(max(d.values()) == t for d, t in zip(l.top_logprobs, l.token_logprobs)), "greedy token is the top one")
check(l.text_offset[0] == 0 and l.text_offset[1] == len(l.tokens[0]), f"text offsets {l.text_offset}")

# Log probabilities, chat format, streamed and not.
cl = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                    temperature=0, max_tokens=30, logprobs=True, top_logprobs=2)
content = cl.choices[0].logprobs.content
# Like vLLM, the final EOS token has an entry too (its text is not in the message).
check("".join(t.token for t in content) == cl.choices[0].message.content + "<|im_end|>", "chat logprob tokens spell the answer")
check(all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content), "chat top_logprobs")
check(content[0].bytes == list(content[0].token.encode()), "chat logprob bytes")
streamed = []
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                            temperature=0, max_tokens=30, logprobs=True, stream=True):
    if chunk.choices and chunk.choices[0].logprobs:
        streamed += chunk.choices[0].logprobs.content
check([t.token for t in streamed] == [t.token for t in content], "streamed chat logprobs equal the full ones")

# echo: the prompt comes back in front of the completion.
e = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0, echo=True)
check(e.choices[0].text == "The capital of France is" + lp.choices[0].text, f"echo {e.choices[0].text!r}")
es = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0, echo=True,
                               stream=True)
check("".join(ch.choices[0].text for ch in es) == e.choices[0].text, "streamed echo")

for kwargs, status in [
    (dict(temperature=-1), 400),
    (dict(n=3, best_of=2), 400),  # best_of must be >= n
    (dict(logprobs=21), 400),     # at most 20 alternatives
    (dict(n=1, best_of=2, stream=True), 400),  # best_of candidates cannot be streamed
    (dict(echo=True, logprobs=1), 400),  # needs prompt logprobs, not supported yet
    (dict(model="nope"), 404),
]:
    args = dict(model=model, prompt="hi", max_tokens=2)
    args.update(kwargs)
    try:
        client.completions.create(**args)
        check(False, f"{kwargs} should fail")
    except openai.APIStatusError as e:
        check(e.status_code == status, f"{kwargs}: status {e.status_code}")
        check(isinstance(e.body, dict) and "message" in e.body, f"{kwargs}: error body {e.body}")

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    check(False, "top_logprobs without logprobs accepted")
except openai.BadRequestError as e:
    check("top_logprobs" in str(e), f"top_logprobs error {e}")

try:
    OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError:
    checks += 1

# Tool calling with a named tool choice (enforced by guided decoding), parsed by the client's
# own types, streamed and not.
weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}]
named = {"type": "function", "function": {"name": "get_weather"}}
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                   tools=weather, tool_choice=named, max_tokens=40, temperature=0)
call = r.choices[0].message.tool_calls[0]
check(r.choices[0].finish_reason == "tool_calls", f"finish_reason {r.choices[0].finish_reason}")
check(call.type == "function" and call.function.name == "get_weather" and call.id, f"tool call {call}")
check(isinstance(json.loads(call.function.arguments).get("city"), str), f"arguments {call.function.arguments}")
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        tools=weather, tool_choice=named, max_tokens=40, temperature=0, stream=True)
name, args, finish = "", "", None
for chunk in stream:
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = ch.finish_reason or finish
check(name == "get_weather" and json.loads(args) == json.loads(call.function.arguments), f"streamed {name} {args}")
check(finish == "tool_calls", f"streamed finish_reason {finish}")

print(f"openai client: {checks} passed, 0 failed")
