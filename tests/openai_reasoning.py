"""The official `openai` client against a server started with `--reasoning-parser qwen3` and
`--structured-outputs-config '{"enable_in_reasoning": true}'`: the thinking comes back as
`reasoning` / `reasoning_content` (extra fields the client keeps), the answer as `content`,
streamed and not. Run by crates/server/tests/reasoning.rs; argv: base URL, API key."""
import sys

from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key)
fixture = "<think>\nSimple sum.\n</think>\n\nFour."
extra = {"structured_outputs": {"choice": [fixture]}}
msgs = [{"role": "user", "content": "What is 2 + 2?"}]

r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=60, extra_body=extra)
m = r.choices[0].message
assert m.content == "\n\nFour.", m
assert getattr(m, "reasoning_content", None) == "\nSimple sum.\n", m
assert getattr(m, "reasoning", None) == "\nSimple sum.\n", m

reasoning, content = "", ""
for chunk in client.chat.completions.create(model="smol", messages=msgs, max_tokens=60, extra_body=extra, stream=True):
    for ch in chunk.choices:
        reasoning += getattr(ch.delta, "reasoning_content", None) or ""
        content += ch.delta.content or ""
assert (reasoning, content) == ("\nSimple sum.\n", "\n\nFour."), (reasoning, content)
print("openai client reasoning: 2 passed")
