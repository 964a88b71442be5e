#!/usr/bin/env python3
"""Generate llama.cpp reference fixtures for lever (see make-llama-cpp-fixtures.sh).

Writes into OUT_DIR:
  tokenize.json    llama-tokenize ids for many tricky strings
  greedy.json      greedy (temp 0) completions from llama-completion, with token ids
  perplexity.json  llama-perplexity on tinyshakespeare, ctx 512, 4 and 16 chunks
  metadata.json    key GGUF metadata (hparams, tokenizer settings, chat template)

Needs the `gguf` and `jinja2` Python packages.
"""
import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import gguf
import jinja2

N_PREDICT = 32
THREADS = "2"
SEED = "1"
PPL_CTX = 512
PPL_CHUNKS = (4, 16)

TOKENIZE_CASES = [
    # plain English
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "HELLO WORLD",
    # whitespace
    " ",
    "  ",
    " Hello",
    "Hello ",
    "  leading and trailing  ",
    "multiple     spaces   between      words",
    "tab\tseparated\tvalues",
    "\t\tindented with tabs",
    "line one\nline two",
    "paragraph one\n\nparagraph two",
    "windows\r\nline endings\r\n",
    "\n",
    "\n\n\n",
    "trailing newline\n",
    " \n \n  \n",
    # digits
    "123",
    "1234567890",
    "3.14159",
    "1,000,000",
    "Call me at (555) 123-4567 or +1-800-555-0199.",
    "In 2024, 42% of 1.5k users paid $9.99.",
    # code
    'fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!("{:?}", x);\n}\n',
    'def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n',
    'class Foo:\n\tdef __init__(self):\n\t\tself.x = {"a": [1, 2]}  # comment\n',
    "if (a != b && c >= d) { return a->b; } // done",
    'print("escaped \\n newline and \\t tab")',
    # unicode
    "café naïve résumé façade",
    "Ångström Zürich São Paulo",
    "日本語のテキストです。",
    "你好，世界！",
    "한국어 문장",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "e\u0301 combining acute, a\u0308 combining diaeresis",
    "Ελληνικά και עברית",
    # emoji
    "I love 🦀 and 🐍!",
    "👍🏽 thumbs up with skin tone",
    "family: 👨\u200d👩\u200d👧\u200d👦",
    "flags: 🇫🇷🇯🇵🇺🇸",
    "❤️ heart with variation selector",
    # contractions
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "John'S book isn'T here",
    # punctuation
    "Wait... what?!?! No way!!!",
    "----- ===== ***** ~~~~~",
    "(([[{{<>}}]]))",
    "\"quoted\" 'single' `backtick`",
    # URLs / paths / email
    "https://example.com/path?query=1&x=y#frag",
    "see http://www.rust-lang.org/learn and /usr/local/bin/",
    "email: someone.else+tag@example.co.uk",
    # special tokens inline
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>",
    "<|im_end|><|im_end|>",
    "<repo_name>lever<file_sep>src/main.rs",
    "<|im_start |>not special",
    # mixed
    "Mixed: English, 日本語, Русский, 123, 🦀, and code `x += 1;`",
    "A" * 50,
    "ab" * 20 + " " + "xyz " * 8,
]

RAW_PROMPTS = [
    ("france", "The capital of France is"),
    ("fibonacci", "def fibonacci(n):"),
    ("once_upon", "Once upon a time"),
    ("rust_fn", "// A Rust function that adds two numbers\nfn add("),
    ("list_colors", "Here is a list of colors:\n1. Red\n2."),
    ("gravity", "Gravity is a force that"),
]

CHAT_CONVERSATIONS = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat_joke", [{"role": "user", "content": "Tell me a short joke."}]),
    ("chat_python", [{"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("chat_system_pirate", [
        {"role": "system", "content": "You are a pirate. Answer like a pirate."},
        {"role": "user", "content": "How are you today?"},
    ]),
    ("chat_system_concise", [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]),
    ("chat_multi_turn", [
        {"role": "user", "content": "Hi! My name is Ana."},
        {"role": "assistant", "content": "Hello Ana! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ]),
]


def run(cmd, stdin=subprocess.DEVNULL):
    p = subprocess.run(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.stderr.write(p.stderr.decode("utf-8", "replace")[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return p.stdout, p.stderr


# ---------------------------------------------------------------- GGUF vocab --

def field_value(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def bytes_to_unicode():
    """GPT-2 byte <-> unicode mapping used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class Vocab:
    def __init__(self, reader):
        self.tokens = field_value(reader, "tokenizer.ggml.tokens")
        self.types = field_value(reader, "tokenizer.ggml.token_type")
        self.byte_decoder = {u: b for b, u in bytes_to_unicode().items()}

    def piece(self, tid, special):
        t = self.tokens[tid]
        ty = self.types[tid]
        if ty == 1:  # normal: byte-level encoded
            return bytes(self.byte_decoder[c] for c in t)
        if ty in (3, 4):  # control / user-defined
            return t.encode("utf-8") if (special or ty == 4) else b""
        return t.encode("utf-8")

    def decode(self, ids, special):
        return b"".join(self.piece(i, special) for i in ids)


# ------------------------------------------------------------------ tools ----

class Tools:
    def __init__(self, bindir, model, tmp):
        self.bindir = bindir
        self.model = model
        self.tmp = tmp
        self.n = 0

    def exe(self, name):
        return os.path.join(self.bindir, name)

    def tmpfile(self, data, suffix=".txt"):
        self.n += 1
        path = os.path.join(self.tmp, f"in{self.n}{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def tokenize_cmd(self, path):
        # -f reads the file verbatim in llama-tokenize; --no-escape keeps backslashes literal;
        # special tokens are parsed by default; BOS added only if the model asks for it.
        return [self.exe("llama-tokenize"), "-m", self.model, "-f", path, "--ids", "--no-escape", "--log-disable"]

    def tokenize(self, text):
        path = self.tmpfile(text.encode("utf-8"))
        out, _ = run(self.tokenize_cmd(path))
        lines = [l for l in out.decode("utf-8").splitlines() if l.startswith("[")]
        if len(lines) != 1:
            raise SystemExit(f"unexpected llama-tokenize output: {out!r}")
        return json.loads(lines[-1])

    def completion_cmd(self, path, extra=()):
        # -bf: prompt bytes verbatim (-f would strip one trailing newline);
        # --no-escape: no \n processing; -no-cnv: raw completion, no chat template;
        # --no-display-prompt: stdout holds only generated text (logs go to stderr).
        return [self.exe("llama-completion"), "-m", self.model, "-bf", path, "--no-escape", "-no-cnv",
                "--no-display-prompt", "--temp", "0", "-n", str(N_PREDICT), "-t", THREADS, "--seed", SEED,
                *extra]


# ---------------------------------------------------------------- fixtures ---

def make_tokenize(tools, vocab, add_bos, version, build):
    cases = []
    for text in TOKENIZE_CASES:
        ids = tools.tokenize(text)
        # sanity: byte-level BPE round trip (with special tokens rendered)
        body = ids[1:] if (add_bos and ids and ids[0] == vocab.bos) else ids
        back = vocab.decode(body, special=True)
        if back != text.encode("utf-8"):
            raise SystemExit(f"tokenize round trip failed for {text!r}: {back!r}")
        cases.append({"text": text, "ids": ids})
    return {
        "tool": "llama-tokenize",
        "llama_cpp_python_version": version,
        "llama_cpp_build": build,
        "command": "llama-tokenize -m MODEL -f <file with exact UTF-8 bytes of text> --ids --no-escape --log-disable",
        "add_bos": add_bos,
        "parse_special": True,
        "cases": cases,
    }


def read_session_tokens(path):
    with open(path, "rb") as f:
        magic, version, n = struct.unpack("<III", f.read(12))
        if magic != 0x6767736E:  # 'ggsn'
            raise SystemExit(f"bad session magic in {path}: {magic:#x}")
        return list(struct.unpack(f"<{n}i", f.read(4 * n)))


def make_greedy(tools, vocab, template, eog_ids, version, build):
    env = jinja2.Environment()
    tmpl = env.from_string(template)
    items = [(name, False, None, prompt) for name, prompt in RAW_PROMPTS]
    for name, msgs in CHAT_CONVERSATIONS:
        prompt = tmpl.render(messages=msgs, add_generation_prompt=True)
        items.append((name, True, msgs, prompt))

    results = []
    for name, chat, msgs, prompt in items:
        sys.stderr.write(f"  greedy: {name}\n")
        prompt_ids = tools.tokenize(prompt)
        path = tools.tmpfile(prompt.encode("utf-8"))

        # run 1: plain, stdout = generated text + (" [end of text]\n" if EOG) + "\n\n"
        out, _ = run(tools.completion_cmd(path))
        # run 2: same, but save the session (prompt + generated token ids) to a state file
        sess = os.path.join(tools.tmp, f"{name}.session")
        if os.path.exists(sess):
            os.remove(sess)
        out2, _ = run(tools.completion_cmd(path, ["--prompt-cache", sess, "--prompt-cache-all"]))
        all_ids = read_session_tokens(sess)
        if all_ids[:len(prompt_ids)] != prompt_ids:
            raise SystemExit(f"{name}: session prompt ids differ from llama-tokenize ids")
        gen_ids = all_ids[len(prompt_ids):]
        stopped_eos = bool(gen_ids) and gen_ids[-1] in eog_ids

        suffix = b" [end of text]\n\n\n" if stopped_eos else b"\n\n"
        if not out.endswith(suffix):
            raise SystemExit(f"{name}: unexpected stdout tail {out[-60:]!r}")
        text_bytes = out[: -len(suffix)]
        if not out2.startswith(text_bytes + suffix[:-2]):
            raise SystemExit(f"{name}: prompt-cache run produced different text")
        # generated text printed with special=false: control tokens render as ""
        if vocab.decode(gen_ids, special=False) != text_bytes:
            raise SystemExit(f"{name}: decoded ids != printed text: {vocab.decode(gen_ids, False)!r} vs {text_bytes!r}")
        if not stopped_eos and len(gen_ids) != N_PREDICT:
            raise SystemExit(f"{name}: expected {N_PREDICT} ids, got {len(gen_ids)}")
        completion_text = text_bytes.decode("utf-8")
        # cross-check: does re-tokenizing prompt+completion reproduce the generated ids?
        retok = tools.tokenize(prompt + completion_text)
        retok_matches = retok[:len(prompt_ids)] == prompt_ids and retok[len(prompt_ids):] == [
            i for i in gen_ids if not (stopped_eos and i == gen_ids[-1])]

        entry = {"name": name, "chat": chat}
        if chat:
            entry["messages"] = msgs
        entry.update({
            "prompt": prompt,
            "prompt_ids": prompt_ids,
            "completion_text": completion_text,
            "completion_ids": gen_ids,
            "stopped_eos": stopped_eos,
            "retokenize_matches": retok_matches,
        })
        results.append(entry)
    return {
        "tool": "llama-completion",
        "llama_cpp_python_version": version,
        "llama_cpp_build": build,
        "command": "llama-completion -m MODEL -bf <file with exact prompt bytes> --no-escape -no-cnv "
                   f"--no-display-prompt --temp 0 -n {N_PREDICT} -t {THREADS} --seed {SEED}",
        "n_predict": N_PREDICT,
        "ids_source": "session file written by a second identical run with --prompt-cache F --prompt-cache-all "
                      "(llama_state_save_file: prompt ids + sampled ids); prompt part checked equal to "
                      "llama-tokenize ids, generated part checked to detokenize to the printed text. "
                      "If stopped_eos, the final id is the end-of-generation token (printed as nothing).",
        "eog_ids": sorted(eog_ids),
        "cases": results,
    }


def make_perplexity(tools, data_file, version, build):
    results = []
    for chunks in PPL_CHUNKS:
        sys.stderr.write(f"  perplexity: {chunks} chunks\n")
        cmd = [tools.exe("llama-perplexity"), "-m", tools.model, "-f", data_file, "-c", str(PPL_CTX),
               "--chunks", str(chunks), "-t", THREADS]
        out, err = run(cmd)
        text = (out + err).decode("utf-8", "replace")
        m = re.findall(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
        if not m:
            raise SystemExit(f"no PPL in llama-perplexity output:\n{text[-2000:]}")
        chunk_ppls = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", text)]
        results.append({"chunks": chunks, "ppl": float(m[-1][0]), "ppl_stderr": float(m[-1][1]),
                        "running_ppl": chunk_ppls})
    return {
        "tool": "llama-perplexity",
        "llama_cpp_python_version": version,
        "llama_cpp_build": build,
        "file": "tinyshakespeare/input.txt",
        "ctx": PPL_CTX,
        "command": f"llama-perplexity -m MODEL -f tinyshakespeare/input.txt -c {PPL_CTX} --chunks N -t {THREADS}",
        "note": "llama-perplexity scores only the second half of each ctx-sized chunk; BOS handling per model "
                "(add_bos); running_ppl is the cumulative estimate printed after each chunk",
        "results": results,
    }


def make_metadata(reader, model_path):
    meta = {}
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores"}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        if key.startswith(("general.", "llama.", "tokenizer.")):
            meta[key] = f.contents()
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    types = field_value(reader, "tokenizer.ggml.token_type")
    merges = field_value(reader, "tokenizer.ggml.merges")
    special = {str(i): {"text": tokens[i], "type": int(types[i])} for i in range(len(tokens)) if types[i] != 1}
    tensor_types = {}
    tensors = {}
    for t in reader.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
        if not re.match(r"blk\.([1-9]|[1-9]\d+)\.", t.name):  # blk.0 is representative of all blocks
            tensors[t.name] = {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
    sha = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {
        "file": os.path.basename(model_path),
        "file_size": os.path.getsize(model_path),
        "sha256": sha.hexdigest(),
        "gguf_version": field_value(reader, "GGUF.version"),
        "tensor_count": len(reader.tensors),
        "tensor_types": tensor_types,
        "tensors_non_block_and_blk0": tensors,
        "token_count": len(tokens),
        "merge_count": len(merges) if merges is not None else 0,
        "token_type_legend": {"1": "normal", "2": "unknown", "3": "control", "4": "user_defined", "5": "unused", "6": "byte"},
        "non_normal_tokens": special,
        "metadata": meta,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True, help="tinyshakespeare/input.txt")
    ap.add_argument("--version", required=True, help="llama-cpp-python version the tools come from")
    ap.add_argument("--only", default="metadata,tokenize,greedy,perplexity")
    args = ap.parse_args()
    only = set(args.only.split(","))

    reader = gguf.GGUFReader(args.model)
    vocab = Vocab(reader)
    vocab.bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token"))
    template = field_value(reader, "tokenizer.chat_template")
    os.makedirs(args.out, exist_ok=True)
    out_v, err_v = run([os.path.join(args.bin, "llama-tokenize"), "--version"])
    build = (out_v + err_v).decode("utf-8", "replace").strip().splitlines()[0]
    build = re.sub(r"^version:\s*", "", build)

    def write(name, obj):
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")
        sys.stderr.write(f"wrote {path} ({os.path.getsize(path)} bytes)\n")

    with tempfile.TemporaryDirectory(prefix="lever-llama-fixtures-") as tmp:
        tools = Tools(args.bin, args.model, tmp)
        # special tokens as llama.cpp resolves them (incl. auto-detected EOT/EOG), from its load log
        out_l, err_l = run(tools.tokenize_cmd(tools.tmpfile(b"x"))[:-1] + ["-lv", "4"])
        resolved = {}
        for m in re.finditer(r"print_info: (.+?) token\s+= (\d+) '(.*)'", (out_l + err_l).decode("utf-8", "replace")):
            resolved.setdefault(m.group(1), []).append({"id": int(m.group(2)), "text": m.group(3)})
        eog = {e["id"] for e in resolved.get("EOG", [])}
        if not eog:
            raise SystemExit("could not find EOG tokens in llama.cpp load log")
        if "metadata" in only:
            meta = make_metadata(reader, args.model)
            meta["llama_cpp_resolved_special_tokens"] = resolved
            write("metadata.json", meta)
        if "tokenize" in only:
            write("tokenize.json", make_tokenize(tools, vocab, add_bos, args.version, build))
        if "greedy" in only:
            write("greedy.json", make_greedy(tools, vocab, template, eog, args.version, build))
        if "perplexity" in only:
            write("perplexity.json", make_perplexity(tools, args.data, args.version, build))


if __name__ == "__main__":
    main()
