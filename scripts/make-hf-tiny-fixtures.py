#!/usr/bin/env python3
# Regenerates the tiny Hugging Face fixtures in crates/lever-model/tests/fixtures/hf-tiny/:
#   tokenizer.json, tokenizer_config.json, tokenizer-cases.json   (shared byte-level BPE tokenizer)
#   llama-f32/  llama-tied-bf16/  qwen2-f16/                     (random-init models + reference.json)
# Everything is created locally (no Hugging Face hub access) from fixed seeds; the tokenizer is
# trained on the first 200 KB of ../shared/data/tinyshakespeare/input.txt.
#
# One-time venv setup (outside the repo, ~7 GB because PyPI's Linux torch wheel needs the CUDA
# runtime wheels just to import, even on CPU; `pip install --no-deps torch` fails to import):
#   python3 -m venv /root/.cache/lever-ref-venv
#   /root/.cache/lever-ref-venv/bin/pip install torch==2.9.1 transformers==4.57.6 \
#       tokenizers==0.22.1 safetensors==0.6.2 numpy==2.4.6 huggingface-hub==0.36.2
# Run (from anywhere; ~10 s on 2 cores; output is deterministic):
#   /root/.cache/lever-ref-venv/bin/python scripts/make-hf-tiny-fixtures.py
import json
import os
import shutil
import sys

EXPECTED = {
    "torch": "2.9.1",
    "transformers": "4.57.6",
    "tokenizers": "0.22.1",
    "safetensors": "0.6.2",
}

import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

for mod in (torch, transformers, tokenizers, safetensors):
    have = mod.__version__.split("+")[0]
    want = EXPECTED[mod.__name__]
    if have != want:
        print(f"warning: {mod.__name__} {have} != pinned {want}; outputs may differ", file=sys.stderr)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
OUT = os.path.join(ROOT, "crates", "lever-model", "tests", "fixtures", "hf-tiny")

TRAIN_BYTES = 200_000
VOCAB_SIZE = 400
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak 123."
CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]
NEW_TOKENS = 16

TOKENIZER_CASES = [
    "",
    " ",
    "Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "many     inner      spaces",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "tabs\tand\r\nCRLF",
    "digits 1234567890 and 3.14159, 42nd",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c0\u00c9\u00ce\u00d5\u00dc",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587",
    "emoji \U0001f44b\U0001f30d \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f",
    "combining e\u0301 vs \u00e9",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|endoftext|>",
    "a<|im_end|>b <|im_start|> c",
    "not special: <|im_start and im_end|>",
    "don't, I'll, we're, they've; it's O'er!",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.",
]


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def build_tokenizer():
    with open(DATA, "rb") as f:
        text = f.read(TRAIN_BYTES).decode("utf-8", errors="ignore")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_config():
    return {
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIALS)
        },
        "additional_special_tokens": SPECIALS[1:],
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def arch_kwargs(vocab):
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attention_dropout=0.0,
    )


def perturb(model, biases):
    """Make RMSNorm weights (and q/k/v biases) non-trivial so the tests notice if they are ignored."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                assert biases, name
                p.copy_(0.1 * torch.randn_like(p))


def rounded(x):
    return float(f"{x:.6g}")


def make_model(name, kind, tied, dtype, tok_dir, vocab):
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **arch_kwargs(vocab), tie_word_embeddings=tied, attention_bias=False, mlp_bias=False
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(
            **arch_kwargs(vocab), tie_word_embeddings=tied, use_sliding_window=False
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    perturb(model, biases=(kind == "qwen2"))
    model.eval()
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, safe_serialization=True)
    # transformers >= 4.56 writes "dtype"; older configs (and many hub models) use "torch_dtype".
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    cfg_json["torch_dtype"] = cfg_json["dtype"]
    write_json(cfg_path, dict(sorted(cfg_json.items())), indent=2)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, fn), os.path.join(folder, fn))

    # Reference: reload the saved folder, upcast to f32, run transformers.
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    ref.eval()
    if tied:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    input_ids = ref_tok.encode(PROMPT, add_special_tokens=False)
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
        out = ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
    greedy = out[0, len(input_ids):].tolist()
    # Cross-check the cached generate() against full recomputation, and record how safe argmax is.
    seq = list(input_ids)
    margins = []
    with torch.no_grad():
        for _ in range(len(greedy)):
            last = ref(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(last.argmax()))
    assert seq[len(input_ids):] == greedy, (seq[len(input_ids):], greedy)
    if len(greedy) < NEW_TOKENS:
        print(f"note: {name} hit EOS after {len(greedy)} tokens", file=sys.stderr)
    chat_prompt = ref_tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = ref_tok.encode(chat_prompt, add_special_tokens=False)
    write_json(
        os.path.join(folder, "reference.json"),
        {
            "prompt": PROMPT,
            "input_ids": input_ids,
            "logits": [[rounded(v) for v in row] for row in logits.tolist()],
            "greedy_ids": greedy,
            "greedy_text": ref_tok.decode(greedy),
            "chat_messages": CHAT_MESSAGES,
            "chat_prompt": chat_prompt,
            "chat_prompt_ids": chat_ids,
        },
    )
    print(
        f"{name}: {sum(p.numel() for p in ref.parameters())} params, logits std {logits.std():.4f}, "
        f"min greedy top1-top2 margin {min(margins):.5f}, greedy {greedy}"
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    write_json(os.path.join(OUT, "tokenizer_config.json"), tokenizer_config(), indent=2)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    print(f"tokenizer: vocab {vocab}")

    tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
    cases = []
    for text in TOKENIZER_CASES:
        enc = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "tokens": enc.tokens,
                "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            }
        )
    write_json(os.path.join(OUT, "tokenizer-cases.json"), {"cases": cases}, indent=1)

    make_model("llama-f32", "llama", False, torch.float32, OUT, vocab)
    make_model("llama-tied-bf16", "llama", True, torch.bfloat16, OUT, vocab)
    make_model("qwen2-f16", "qwen2", False, torch.float16, OUT, vocab)


if __name__ == "__main__":
    main()
