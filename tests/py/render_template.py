"""Renders chat templates exactly as Hugging Face transformers does, for the golden test
(tests/tests/chat_template.rs), which compares the output with `worker chat-template`.

transformers (src/transformers/utils/chat_template_utils.py, `_compile_jinja_template`) renders
with jinja2's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) and the
loopcontrols extension, the globals `raise_exception` (raises TemplateError) and `strftime_now`
(datetime.now().strftime), and a `tojson` filter that is json.dumps with ensure_ascii=False.
The context holds `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.

Usage: render_template.py CASES.json
CASES.json is a list of {"template", "bos_token", "eos_token", "add_generation_prompt",
"messages"}; stdout gets a JSON list with one entry per case, in order: {"ok": TEXT} or
{"error": MESSAGE} (the template failed to compile or raised).
"""

import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def strftime_now(format):
    return datetime.now().strftime(format)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers: "We override the built-in tojson filter because Jinja's default filter
    # escapes HTML characters".
    return json.dumps(
        x,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def environment():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: render_template.py CASES.json")
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    env = environment()
    compiled = {}
    results = []
    for case in cases:
        source = case["template"]
        try:
            if source not in compiled:
                compiled[source] = env.from_string(source)
            # Each message as clients write it and the worker passes it: role, then content.
            messages = [{"role": m["role"], "content": m["content"]} for m in case["messages"]]
            # As transformers' apply_chat_template: tools and documents are None without tools.
            text = compiled[source].render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=case["add_generation_prompt"],
                bos_token=case["bos_token"],
                eos_token=case["eos_token"],
            )
            results.append({"ok": text})
        except Exception as e:  # the test compares failures too
            results.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(results, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
