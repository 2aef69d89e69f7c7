"""The official `openai` Python SDK against belljar's HTTP API (tests/tests/openai_sdk.rs):
models, chat completions whole and streamed, stop texts, max_tokens, usage with cached tokens,
legacy completions, and two answers a small instruct model gets right at temperature 0.

Usage: openai_e2e.py BASE_URL MODEL
Prints each check as it passes; exits non-zero with the failed check's message.
"""

import sys

import openai


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)
    print(f"ok: {what}", flush=True)


def usage_adds_up(usage, what):
    check(usage is not None, f"{what}: usage is present")
    p, c, t = usage.prompt_tokens, usage.completion_tokens, usage.total_tokens
    check(
        isinstance(p, int) and isinstance(c, int) and p > 0 and c >= 0 and t == p + c,
        f"{what}: usage adds up (prompt {p} + completion {c} = total {t})",
    )
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None else None
    check(
        isinstance(cached, int) and 0 <= cached <= p,
        f"{what}: prompt_tokens_details.cached_tokens {cached} is within the prompt's {p}",
    )
    return usage


def stream_chat(client, **kwargs):
    """A streamed chat completion: its text, finish_reason and usage chunk."""
    text, finish, usage, chunks = "", None, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        chunks += 1
        if chunk.usage is not None:
            check(chunk.choices == [], "the usage chunk has no choices")
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
            if choice.finish_reason is not None:
                check(finish is None, "one finish_reason in a stream")
                finish = choice.finish_reason
    check(chunks >= 2, f"the stream came in {chunks} chunks")
    return text, finish, usage


def middle_stop(text):
    """A short piece from the middle of `text` and the text before its first occurrence."""
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start : start + 3]
        if stop.strip() and text.find(stop) > 0:
            return stop, text[: text.find(stop)]
    raise CheckFailed(f"no usable stop text in {text!r}")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: openai_e2e.py BASE_URL MODEL")
    base_url, model = sys.argv[1], sys.argv[2]
    print(f"openai {openai.__version__} against {base_url}", flush=True)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list()]
    check(model in ids, f"models.list() shows {model}: {ids}")

    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    base = dict(model=model, messages=story, temperature=0, max_tokens=24)

    # Whole.
    r = client.chat.completions.create(**base)
    check(r.object == "chat.completion", f"object is chat.completion: {r.object}")
    choice = r.choices[0]
    whole = choice.message.content
    check(choice.message.role == "assistant", "the reply is the assistant's")
    check(isinstance(whole, str) and whole != "", f"a reply: {whole!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
    u = usage_adds_up(r.usage, "chat")
    print(f"chat: {whole!r}", flush=True)

    # Streamed, with usage: the same greedy text and the same counts.
    text, finish, su = stream_chat(client, **base, stream_options={"include_usage": True})
    check(text == whole, f"streamed text is the whole one: {text!r}")
    check(finish == choice.finish_reason, f"streamed finish_reason {finish}")
    usage_adds_up(su, "streamed chat")
    check(
        (su.prompt_tokens, su.completion_tokens) == (u.prompt_tokens, u.completion_tokens),
        f"streamed usage {su.prompt_tokens}+{su.completion_tokens} is the whole one's "
        f"{u.prompt_tokens}+{u.completion_tokens}",
    )
    check(
        su.prompt_tokens_details.cached_tokens > 0,
        f"the repeated prompt is reused: cached_tokens {su.prompt_tokens_details.cached_tokens}",
    )

    # Stop: a piece from the middle of the greedy reply ends it there, and is not in it.
    stop, before = middle_stop(whole)
    r = client.chat.completions.create(**base, stop=[stop])
    got = r.choices[0].message.content
    check(r.choices[0].finish_reason == "stop", f"stop {stop!r}: finish_reason stop")
    check(stop not in got and got == before, f"stop {stop!r}: the text before it: {got!r}")
    usage_adds_up(r.usage, "chat with a stop text")
    text, finish, _ = stream_chat(client, **base, stop=stop)
    check(finish == "stop" and text == before, f"streamed stop {stop!r}: {text!r}")

    # max_tokens=3: cut at the limit.
    r = client.chat.completions.create(**{**base, "max_tokens": 3})
    check(r.choices[0].finish_reason == "length", "max_tokens=3: finish_reason length")
    check(r.usage.completion_tokens == 3, f"max_tokens=3: {r.usage.completion_tokens} tokens")
    usage_adds_up(r.usage, "max_tokens=3")
    text, finish, su = stream_chat(
        client, **{**base, "max_tokens": 3}, stream_options={"include_usage": True}
    )
    check(finish == "length" and su.completion_tokens == 3, "streamed max_tokens=3: length, 3")

    # Legacy completions, whole and streamed.
    r = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    check(r.object == "text_completion", f"object is text_completion: {r.object}")
    legacy = r.choices[0].text
    check(isinstance(legacy, str) and legacy != "", f"a completion: {legacy!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), "completion finish_reason")
    usage_adds_up(r.usage, "completion")
    streamed = ""
    usage = None
    for chunk in client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            streamed += c.text
    check(streamed == legacy, f"streamed completion is the whole one: {streamed!r}")
    usage_adds_up(usage, "streamed completion")

    # Answers at temperature 0.
    # The sky's answer runs to hundreds of tokens and says "blue" in its first sentence; at
    # temperature 0 its first 64 tokens are the start of the whole answer.
    for question, want, limit in [
        ("What is 2 + 2?", "4", {}),
        ("What color is the sky on a clear day?", "blue", {"max_tokens": 64}),
    ]:
        r = client.chat.completions.create(
            model=model,
            temperature=0,
            messages=[{"role": "user", "content": question}],
            **limit,
        )
        answer = r.choices[0].message.content
        check(want in answer.lower(), f"{question!r} -> {answer!r} contains {want!r}")
        usage_adds_up(r.usage, question)

    print("all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as e:
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
    except openai.APIError as e:
        print(f"FAILED: the API answered an error: {e!r}", flush=True)
        sys.exit(1)
