"""Put LoRA adapters on the factors of an inherited model, train a few steps, save the adapter, and load it
back on top of the reloaded inherited model.

    python examples/lora_on_inherited.py --inherited_dir out/minilm-inher --output_dir out/minilm-inher-lora

`--inherited_dir` is a folder written by examples/compress_and_reload.py, or any InherModel.save_pretrained of a
model with a loss: a sequence classifier (task_type SEQ_CLS) or a causal LM (CAUSAL_LM).
"""

import argparse

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from inhernet_hf import InherModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inherited_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.inherited_dir)
    model = InherModel.from_pretrained(args.inherited_dir)
    is_classifier = model.inher_config.task_type == "SEQ_CLS"
    if model.inher_config.task_type not in ("SEQ_CLS", "CAUSAL_LM"):
        parser.error(f"{args.inherited_dir} was inherited with task_type={model.inher_config.task_type!r}; this "
                     f"example trains a sequence classifier (SEQ_CLS) or a causal LM (CAUSAL_LM), whose outputs have "
                     f"a loss.")
    lora = LoraConfig(r=args.lora_r, target_modules=["inher_down", "inher_up"],
                      modules_to_save=["classifier"] if is_classifier else None,
                      task_type=model.inher_config.task_type)
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    texts = ["a gripping, beautifully acted film", "a dull and lifeless script"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    # causal LM: predict the text itself, padding positions ignored (-100)
    labels = (torch.tensor([1, 0]) if is_classifier
              else batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(args.output_dir)

    reloaded = PeftModel.from_pretrained(InherModel.from_pretrained(args.inherited_dir), args.output_dir)
    reloaded.eval()
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)
    print("adapter reloaded on the inherited model, identical logits:", same)
    if not same:
        raise SystemExit("reloaded adapter gives different logits")


if __name__ == "__main__":
    main()
