"""The logits transformers computes for a model folder `lever pretrain` wrote (RUN/model), and
the ids its tokenizer gives: the reference for crates/lever/tests/pretrain.rs
(`the_model_folder_gives_transformers_logits`). Run by scripts/make-pretrain-fixtures.sh.

    python scripts/pretrain_transformers.py RUN/model TEXT > transformers.json
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    folder, text = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    json.dump(
        {
            "text": text,
            "ids": ids,
            "logits": [[round(float(x), 7) for x in row] for row in logits],
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
