#!/usr/bin/env python3
"""llama.cpp's greedy completions on Gemma 3 (issue 22: the teacher-forced agreement).

Writes crates/lever/tests/fixtures/llama-cpp/gemma3-greedy.json: for each raw prompt (Gemma 3
270M is a base model: no chat template), `llama-completion --temp 0` generates 32 tokens and
a second identical run saves its session, whose ids are the prompt's (checked equal to
`llama-tokenize`) then the generated ones. `reference_llama_cpp.rs` feeds lever llama.cpp's
tokens step by step and counts the steps where lever's greedy pick is llama.cpp's, as the
default model's test does.

    python3 scripts/gemma3_greedy_fixture.py [MODEL.gguf]

MODEL defaults to the registry's gemma3-270m in $LEVER_HOME (`lever models pull gemma3-270m`).
The llama.cpp tools come from ../shared/tools/llama-cpp-reference.sh. Needs the `gguf` and
`jinja2` Python packages (as make-llama-cpp-fixtures.sh). About a minute on 2 cores.
"""
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from llama_cpp_fixtures import (  # noqa: E402
    N_PREDICT, RAW_PROMPTS, SEED, THREADS, Tools, read_session_tokens, run)
from gemma3_tokenize_fixture import gemma3_model_and_tools  # noqa: E402

MORE_PROMPTS = [
    ("photosynthesis", "Photosynthesis is the process by which"),
    ("python_sort", "# Sort a list of numbers in Python\nnumbers = [5, 2, 9, 1]\n"),
    ("recipe", "To make a simple tomato sauce, you need"),
    ("history", "The Roman Empire was"),
    ("json", '{"name": "Alice", "age": 30, "city":'),
    ("question", "Question: What is the largest planet in the solar system?\nAnswer:"),
]


def main():
    model, bindir = gemma3_model_and_tools()
    cases = []
    with tempfile.TemporaryDirectory(prefix="lever-gemma3-greedy-") as tmp:
        tools = Tools(bindir, model, tmp)
        for name, prompt in RAW_PROMPTS + MORE_PROMPTS:
            sys.stderr.write(f"  greedy: {name}\n")
            prompt_ids = tools.tokenize(prompt)
            path = tools.tmpfile(prompt.encode("utf-8"))
            sess = os.path.join(tmp, f"{name}.session")
            run(tools.completion_cmd(path, ["--prompt-cache", sess, "--prompt-cache-all"]))
            ids = read_session_tokens(sess)
            if ids[:len(prompt_ids)] != prompt_ids:
                raise SystemExit(f"{name}: session prompt ids differ from llama-tokenize ids")
            gen = ids[len(prompt_ids):]
            if not gen:
                raise SystemExit(f"{name}: nothing generated")
            cases.append({"name": name, "prompt": prompt, "prompt_ids": prompt_ids,
                          "completion_ids": gen})
    fixture = {
        "tool": "llama-completion",
        "command": "llama-completion -m MODEL -bf <file with exact prompt bytes> --no-escape -no-cnv "
                   f"--no-display-prompt --temp 0 -n {N_PREDICT} -t {THREADS} --seed {SEED} "
                   "--prompt-cache F --prompt-cache-all (ids from the session file F)",
        "model": os.path.basename(model),
        "cases": cases,
    }
    dest = os.path.join(ROOT, "crates", "lever", "tests", "fixtures", "llama-cpp", "gemma3-greedy.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    sys.stderr.write(f"wrote {dest} ({os.path.getsize(dest)} bytes)\n")


if __name__ == "__main__":
    main()
