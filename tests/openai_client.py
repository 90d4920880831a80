"""Drive a running vllm-server with the official `openai` Python client.

Usage: python tests/openai_client.py BASE_URL API_KEY
Exits non-zero (with a message) on the first failed check; prints a summary line.
"""
import sys

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

for kwargs, status in [
    (dict(temperature=-1), 400),
    (dict(n=2), 400),            # n > 1 is not supported yet (rejected, never ignored)
    (dict(logprobs=2), 400),     # logprobs are not supported yet
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
    OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError:
    checks += 1

print(f"openai client: {checks} passed, 0 failed")
