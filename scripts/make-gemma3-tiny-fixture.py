#!/usr/bin/env python3
# Regenerates crates/lever-model/tests/fixtures/hf-tiny/gemma3-f32/: a tiny random-init
# Gemma3ForCausalLM (3 layers: local, global, local; sliding window 5, shorter than the
# 39-token prompt; one KV head; head size 32 != C/H; query_pre_attn_scalar 24, so the
# attention scale is not 1/sqrt(head size); non-zero norm weights, stored as w of x*(1+w))
# and reference.json with transformers' logits (eager attention, f32) and greedy continuation.
# Uses the shared byte-level BPE tokenizer of hf-tiny/ (made by make-hf-tiny-fixtures.py).
# Run (~10 s, deterministic): /root/.cache/lever-ref-venv/bin/python scripts/make-gemma3-tiny-fixture.py
import json
import os
import shutil
import sys

import torch
import transformers

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "crates", "lever-model", "tests", "fixtures", "hf-tiny")
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak 123."
NEW_TOKENS = 16
print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def rounded(x):
    return float(f"{x:.6g}")


def main():
    folder = os.path.join(OUT, "gemma3-f32")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(OUT, "tokenizer.json"))
    vocab = len(tok)
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=24,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(OUT, fn), os.path.join(folder, fn))

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    ref.eval()
    assert type(ref).__name__ == "Gemma3ForCausalLM", type(ref)
    input_ids = tok.encode(PROMPT, add_special_tokens=False)
    assert len(input_ids) > 2 * cfg.sliding_window
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None,
        )
    greedy = out[0, len(input_ids):].tolist()
    # The cached generate() against full recomputation; the window must change the answer.
    seq = list(input_ids)
    margins = []
    with torch.no_grad():
        for _ in range(len(greedy)):
            last = ref(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(last.argmax()))
        assert seq[len(input_ids):] == greedy, (seq[len(input_ids):], greedy)
        ref.config.sliding_window = 10_000
        for layer in ref.model.layers:
            layer.self_attn.sliding_window = None
        full = ref(ids).logits[0].float()
    window_effect = float((full - logits).abs().max())
    assert window_effect > 1e-2, window_effect
    write_json(
        os.path.join(folder, "reference.json"),
        {
            "prompt": PROMPT,
            "input_ids": input_ids,
            "logits": [[rounded(v) for v in row] for row in logits.tolist()],
            "greedy_ids": greedy,
        },
    )
    print(
        f"gemma3-f32: {sum(p.numel() for p in ref.parameters())} params, logits std {logits.std():.4f}, "
        f"window moves logits by {window_effect:.4f}, min greedy margin {min(margins):.5f}, greedy {greedy}"
    )


if __name__ == "__main__":
    main()
