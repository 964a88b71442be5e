"""The official `openai` Python client against `lever serve` (run by tests/serve.rs):
chat, streaming chat, embeddings, structured output (the client's `parse` with a Pydantic model,
a streamed JSON object), log-probabilities (chat, and completions with echo), and errors raised as the client's own exception types (with
the parameter at fault named for one lever does not support)."""
import math
import os
import sys

import openai

base = os.environ["LEVER_URL"]
key = os.environ["LEVER_KEY"]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


models = [m.id for m in client.models.list()]
check(models == ["smollm2-135m-instruct", "all-minilm-l6-v2"], f"models {models}")

msgs = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=12, temperature=0, seed=1)
text = r.choices[0].message.content
check(r.object == "chat.completion" and text and r.choices[0].message.role == "assistant", f"chat {r}")
check(r.choices[0].finish_reason in ("stop", "length"), f"finish {r.choices[0].finish_reason}")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}")

stream = client.chat.completions.create(
    model="smollm2-135m-instruct", messages=msgs, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(pieces) == text, f"stream {''.join(pieces)!r} vs {text!r}")
check(finish == r.choices[0].finish_reason and usage == r.usage, f"stream end {finish} {usage}")

e = client.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "second"])
check(len(e.data) == 2 and len(e.data[0].embedding) == 384, "embedding shape")
norm = math.sqrt(sum(x * x for x in e.data[0].embedding))
check(abs(norm - 1) < 1e-4, f"embedding norm {norm}")

try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    check(False, "unknown model accepted")
except openai.NotFoundError as err:
    check(err.status_code == 404 and "no-such-model" in str(err), f"not found {err}")

try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    check(False, "wrong key accepted")
except openai.AuthenticationError as err:
    check(err.status_code == 401, f"auth {err}")

try:
    client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, temperature=9)
    check(False, "temperature 9 accepted")
except openai.BadRequestError as err:
    check(err.status_code == 400, f"bad request {err}")

try:
    client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, logit_bias={"42": 5})
    check(False, "logit_bias accepted")
except openai.BadRequestError as err:
    check(err.status_code == 400 and err.param == "logit_bias", f"unsupported {err}")

# Log-probabilities, read through the client's own types.
r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=6,
                                   temperature=0, logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
check(len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in lp),
      f"chat logprobs {lp}")
check(all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in lp),
      f"chat logprob values {lp}")
c = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                              max_tokens=1, temperature=0, logprobs=1, echo=True)
clp = c.choices[0].logprobs
check(clp.token_logprobs[0] is None and len(clp.tokens) == c.usage.total_tokens
      and c.choices[0].text.startswith("The capital of France is"), f"echo logprobs {clp}")

# Structured output: the client's own `parse` with a Pydantic model (response_format
# json_schema, strict), a streamed JSON object, and a schema that is not one (400 naming
# response_format).
from pydantic import BaseModel  # noqa: E402


class City(BaseModel):
    name: str
    country: str
    population: int


ask = [{"role": "user", "content": "Describe the city of Paris."}]
r = client.beta.chat.completions.parse(model="smollm2-135m-instruct", messages=ask, response_format=City,
                                       max_tokens=80, temperature=0, seed=1)
city = r.choices[0].message.parsed
check(isinstance(city, City) and city.name, f"parse {r.choices[0].message.content!r}")

stream = client.chat.completions.create(
    model="smollm2-135m-instruct", messages=ask, max_tokens=120, temperature=0, seed=3, stream=True,
    response_format={"type": "json_object"},
)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
import json  # noqa: E402
check(isinstance(json.loads(streamed), dict), f"streamed JSON object {streamed!r}")

try:
    client.chat.completions.create(
        model="smollm2-135m-instruct", messages=ask,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "strnig"}}})
    check(False, "a bad schema accepted")
except openai.BadRequestError as err:
    check(err.status_code == 400 and err.param == "response_format" and "strnig" in str(err),
          f"bad schema {err}")

# Tools: a required call through the client's types (arguments valid against the function's
# parameters), streamed the same, then the round trip: the call and its result go back in the
# history and the model answers (a call or text; either way the client reads it).
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, tools=tools,
                                   tool_choice="required", max_tokens=60, temperature=0)
m = r.choices[0].message
check(r.choices[0].finish_reason == "tool_calls" and m.content is None and len(m.tool_calls) == 1,
      f"tool call {r}")
call = m.tool_calls[0]
args = json.loads(call.function.arguments)
check(call.type == "function" and call.function.name == "get_weather" and call.id
      and isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"),
      f"tool call arguments {call}")
stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=ask, tools=tools,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        max_tokens=60, temperature=0, stream=True)
deltas, finish = [], None
for chunk in stream:
    for c in chunk.choices:
        deltas += c.delta.tool_calls or []
        finish = c.finish_reason or finish
check(finish == "tool_calls" and len(deltas) == 1 and deltas[0].function.name == "get_weather"
      and json.loads(deltas[0].function.arguments) == args, f"streamed tool call {deltas}")
history = ask + [m.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
r = client.chat.completions.create(model="smollm2-135m-instruct", messages=history, tools=tools,
                                   max_tokens=40, temperature=0)
m = r.choices[0].message
check(bool(m.content) or (m.tool_calls and m.tool_calls[0].function.name == "get_weather"),
      f"answer after the tool result {r}")

print("openai client: all checks passed")
