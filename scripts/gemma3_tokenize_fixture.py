#!/usr/bin/env python3
"""llama.cpp's token ids for Gemma 3's SentencePiece vocabulary (issue 22 item 3).

Writes crates/lever/tests/fixtures/llama-cpp/gemma3-tokenize.json: `llama-tokenize` ids for
the strings the llama-family fixture uses (scripts/llama_cpp_fixtures.py TOKENIZE_CASES) plus
strings that need byte fallback or Gemma's whitespace and special tokens.

    python3 scripts/gemma3_tokenize_fixture.py [MODEL.gguf]

MODEL defaults to the registry's gemma3-270m in $LEVER_HOME (`lever models pull gemma3-270m`).
The llama.cpp tools come from ../shared/tools/llama-cpp-reference.sh. Needs the `gguf` and
`jinja2` Python packages (as make-llama-cpp-fixtures.sh). Takes a few seconds.
"""
import json
import os
import subprocess
import sys
import tempfile

import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from llama_cpp_fixtures import TOKENIZE_CASES, Tools, field_value, run  # noqa: E402

EXTRA_CASES = [
    # byte fallback: characters no piece covers
    "\x01\x02\x07\x1b[0m\x7f control characters",
    "bell\x07 and escape\x1b",
    "𓀀𓀁 hieroglyphs 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 fraktur",
    "private use \ue000\ue001 and \U000f0000",
    "replacement \ufffd and BOM \ufeff",
    "🫠🫥🪿 newer emoji",
    "🧑🏿‍🚀 astronaut with skin tone",
    "齉龘𰻞 rare CJK 𠀀𪚥",
    "ᚠᚢᚦᚨᚱᚲ runes ꙮ",
    "zero\u200bwidth\u200cjoiners\u200d",
    # whitespace Gemma keeps as user-defined tokens
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    " ",
    "\t",
    "\t \t \n \n\t",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
    " " * 40 + "x",
    "line\n  indented\n    more\n\tand tab\n",
    "\r\n\r\n",
    # Gemma's special tokens and markup
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos",
    "<eos>",
    "<unused5> and <pad>",
    "<start_of_turn >not special",
    "<table><tr><td>cell</td></tr></table>",
    "<h1>Title</h1>\n<p>para</p>",
    "[multimodal] tag",
]


def gemma3_model_and_tools():
    """The gemma3-270m file (argv[1], or the registry's in $LEVER_HOME) and llama.cpp's tools."""
    home = os.environ.get("LEVER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "lever")
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        home, "models", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(model):
        raise SystemExit(f"model not found: {model} (lever models pull gemma3-270m)")
    out = subprocess.run([os.path.join(ROOT, "..", "shared", "tools", "llama-cpp-reference.sh")],
                         check=True, stdout=subprocess.PIPE).stdout.decode().strip().splitlines()
    return model, out[-1]


def main():
    model, bindir = gemma3_model_and_tools()
    reader = gguf.GGUFReader(model)
    add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token"))
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")

    def piece(t):
        text = tokens[t]
        if types[t] == 6:  # byte: <0xAB>
            return bytes([int(text[3:5], 16)])
        if types[t] == 1:
            return text.replace("\u2581", " ").encode("utf-8")
        return text.encode("utf-8")

    version_out, version_err = run([os.path.join(bindir, "llama-tokenize"), "--version"])
    build = (version_out + version_err).decode("utf-8", "replace").strip().splitlines()
    build = next((l for l in build if "version" in l), "unknown")
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        tools = Tools(bindir, model, tmp)
        for text in TOKENIZE_CASES + EXTRA_CASES:
            ids = tools.tokenize(text)
            body = ids[1:] if add_bos and ids and ids[0] == bos else ids
            back = b"".join(piece(t) for t in body)
            if back != text.encode("utf-8"):
                raise SystemExit(f"round trip failed for {text!r}: {back!r}")
            cases.append({"text": text, "ids": ids})
    fx = {
        "tool": "llama-tokenize",
        "llama_cpp_build": build,
        "model": os.path.basename(model),
        "command": "llama-tokenize -m MODEL -f <file with exact UTF-8 bytes of text> --ids --no-escape --log-disable",
        "add_bos": add_bos,
        "add_space_prefix": bool(field_value(reader, "tokenizer.ggml.add_space_prefix")),
        "parse_special": True,
        "made_by": "scripts/gemma3_tokenize_fixture.py",
        "cases": cases,
    }
    dest = os.path.join(ROOT, "crates", "lever", "tests", "fixtures", "llama-cpp", "gemma3-tokenize.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(fx, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{dest}: {len(cases)} cases")


if __name__ == "__main__":
    main()
