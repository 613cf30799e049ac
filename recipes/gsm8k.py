"""Fine-tune (dense) or inherit-and-distil (InherNet) a causal LM on GSM8K with Accelerate; evaluate by answer NLL
under teacher forcing and by exact match of greedy generations.

    # dense fine-tune (the reference)
    accelerate launch recipes/gsm8k.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --no_inher \\
        --output_dir out/gsm8k-dense
    # InherNet at 60% of the targeted parameters, whitened init, token-level KD from the dense model
    accelerate launch recipes/gsm8k.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --inher_target_ratio 0.6 --inher_num_heads 2 --inher_init whitened --kd_alpha 0.5 --output_dir out/gsm8k-inher

Data comes from the Hub (`openai/gsm8k`, config `main`) or, with `--data_dir`, from `train.jsonl` / `test.jsonl`
with the keys `question` and `answer` (the layout of openai/grade-school-math). The prompt is the tokenizer's chat
template (one user turn) when it has one, else `--prompt_template`; the loss covers the answer tokens only (and the
end-of-turn token). The training loop, token-level KD, checkpoints and gathering live in `inhernet_hf.training`.

Outputs in `--output_dir`: the model (an inherited one via `InherModel.save_pretrained`), `all_results.json`
(`eval_answer_nll`, `eval_answer_perplexity`, `eval_exact_match`, parameter counts, times) and
`predictions.jsonl` (one line per generated test question).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

import inhernet_hf  # noqa: F401  (registers the inherited layers with transformers: inherited models load)
from inhernet_hf.checkpoints import CheckpointError, resolve_checkpoint
from inhernet_hf.distill import DistillationLoss, check_hidden_states_match
from inhernet_hf.flags import add_inher_args, add_kd_args, add_training_args, check_common_args, inher_config_from_args
from inhernet_hf.metrics import load_metric
from inhernet_hf.training import (NonFiniteLossError, TrackingError, build_accelerator, build_optimizer,
                                  count_target_tokens, create_hub_repo, finish_run, inherit_for_training, param_counts,
                                  prepare_training, run_results, train)

HUB_DATASET, HUB_CONFIG = "openai/gsm8k", "main"
IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<16-3-4=9>>" calculator traces
# A number: thousands groups with commas (1,234,567.5), or plain digits with an optional decimal part. A minus sign
# counts only where it cannot be a hyphen or a range dash ("3-4 hours" is 3 and 4); a number starts at no digit,
# word character, point or comma ("1,2345" is not 1,234 + 5; ".5" is not 5).
# The minus is an ASCII hyphen or U+2212 and may precede a dollar sign ("-$5").
NUMBER = re.compile(r"(?:(?<![\w.\-\u2212])[-\u2212]\$?)?(?<![\w.,])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Gsm8kRecipeError(ValueError):
    """Bad input, reported before training starts."""


# ----------------------------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------------------------


def normalize_number(text: str) -> Optional[str]:
    """'1,234.50' -> '1234.5', '18.00' -> '18', '-3' -> '-3', '$7' -> '7', '-$5' -> '-5'; None when `text` holds no
    number."""
    match = NUMBER.search(text)
    if match is None:
        return None
    try:
        value = Decimal(match.group().replace(",", "").replace("$", "").replace("\u2212", "-"))
    except InvalidOperation:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def extract_answer(text: str) -> Optional[str]:
    """The final numeric answer of a GSM8K solution or a model's generation: the first number after the first
    '####' that has one (GSM8K's answer marker; a model may ramble on after it), else the last number in `text`;
    commas, currency signs and trailing zeros normalised away. None when there is no number at all."""
    for tail in text.split("####")[1:]:
        answer = normalize_number(tail)
        if answer is not None:
            return answer
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> dict[str, list[str]]:
    """A GSM8K JSONL file as {'question': [...], 'answer': [...]}; every line is checked."""
    data: dict[str, list[str]] = {"question": [], "answer": []}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise Gsm8kRecipeError(f"{path}:{line_number} is not valid JSON ({err}).") from None
            missing = [k for k in data if not isinstance(record.get(k), str)]
            if missing:
                raise Gsm8kRecipeError(f"{path}:{line_number} needs the string keys ['question', 'answer'] (GSM8K "
                                       f"layout), missing or not text: {missing}; keys found: {sorted(record)}.")
            for key in data:
                data[key].append(record[key])
    if not data["question"]:
        raise Gsm8kRecipeError(f"{path} has no examples.")
    return data


def load_gsm8k(data_dir: Optional[str]) -> DatasetDict:
    """'train' and 'test' splits with the columns question/answer, from `data_dir`/{train,test}.jsonl or the Hub."""
    if data_dir is not None:
        files = {split: Path(data_dir) / f"{split}.jsonl" for split in ("train", "test")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise Gsm8kRecipeError(f"--data_dir {data_dir}: missing {missing} (expected train.jsonl and test.jsonl "
                                   f"with the keys question/answer, as in openai/grade-school-math).")
        return DatasetDict({split: Dataset.from_dict(read_jsonl(path)) for split, path in files.items()})
    from datasets import load_dataset

    try:
        raw = load_dataset(HUB_DATASET, HUB_CONFIG)
    except Exception as err:  # offline, ...
        raise Gsm8kRecipeError(f"could not load {HUB_DATASET}/{HUB_CONFIG} from the Hub ({type(err).__name__}: "
                               f"{err}). Use --data_dir with train.jsonl/test.jsonl instead.") from err
    return DatasetDict({split: raw[split].select_columns(["question", "answer"]) for split in ("train", "test")})


class PromptFormatter:
    """Question -> prompt token ids, and answer -> target token ids ending with `end_ids`.

    'chat' renders one user turn (after `system_prompt`) with the tokenizer's chat template and the generation
    prompt, and ends answers with what the template writes after an assistant turn (its end-of-turn token, which
    need not be the eos token); 'plain' fills `template` (which must contain '{question}') and ends answers with eos;
    'auto' is 'chat' when the tokenizer has a template."""

    def __init__(self, tokenizer, prompt_format: str = "auto", template: str = DEFAULT_TEMPLATE,
                 system_prompt: Optional[str] = None, keep_calculator_annotations: bool = False) -> None:
        if prompt_format not in ("auto", "chat", "plain"):
            raise Gsm8kRecipeError(f"--prompt_format must be 'auto', 'chat' or 'plain', got {prompt_format!r}.")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if prompt_format == "chat" and not has_template:
            raise Gsm8kRecipeError("--prompt_format chat: this tokenizer has no chat template; use --prompt_format "
                                   "plain (with --prompt_template).")
        self.chat = prompt_format == "chat" or (prompt_format == "auto" and has_template)
        if self.chat and template != DEFAULT_TEMPLATE:
            raise Gsm8kRecipeError("--prompt_template is used only by the plain prompt format, and this run uses the "
                                   "tokenizer's chat template; add --prompt_format plain or remove --prompt_template.")
        if not self.chat and system_prompt is not None:
            raise Gsm8kRecipeError("--system_prompt is a chat-template turn, unused by the plain prompt format; put "
                                   "it in --prompt_template or remove it.")
        if not self.chat and "{question}" not in template:
            raise Gsm8kRecipeError(f"--prompt_template must contain '{{question}}', got {template!r}.")
        if tokenizer.eos_token_id is None:
            raise Gsm8kRecipeError("the tokenizer has no eos token: the answers could not be terminated.")
        self.tokenizer, self.template, self.system_prompt = tokenizer, template, system_prompt
        self.keep_calculator_annotations = keep_calculator_annotations
        self.end_ids = self.end_of_turn_ids() if self.chat else [tokenizer.eos_token_id]
        # generation stops at eos, and at a one-token end of turn
        self.stop_ids = sorted({tokenizer.eos_token_id, *(self.end_ids if len(self.end_ids) == 1 else [])})

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return system + [{"role": "user", "content": question}]

    def end_of_turn_ids(self) -> list[int]:
        """The token ids the chat template writes right after an assistant turn's content (trailing whitespace
        dropped): e.g. '<|im_end|>'; eos when the template writes nothing there."""
        marker = "GSM8K_ANSWER_END_MARKER"
        text = self.tokenizer.apply_chat_template(self.messages("q") + [{"role": "assistant", "content": marker}],
                                                  tokenize=False)
        if marker not in text:
            raise Gsm8kRecipeError("the chat template does not render an assistant turn's content as given, so its "
                                   "end-of-turn token cannot be found; use --prompt_format plain.")
        end = text[text.index(marker) + len(marker):].rstrip()
        return self.tokenizer(end, add_special_tokens=False)["input_ids"] if end else [self.tokenizer.eos_token_id]

    def prompt_text(self, question: str) -> str:
        if not self.chat:
            return self.template.format(question=question)
        return self.tokenizer.apply_chat_template(self.messages(question), tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, question: str) -> list[int]:
        # The chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
        return self.tokenizer(self.prompt_text(question), add_special_tokens=not self.chat)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        if not self.keep_calculator_annotations:
            answer = CALCULATOR_ANNOTATION.sub("", answer)
        answer = answer if self.chat else " " + answer
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + self.end_ids

    def encode(self, question: str, answer: str, max_length: int) -> dict[str, Any]:
        """input_ids = prompt + answer (truncated to `max_length`); labels = IGNORE_INDEX on the prompt; truncated:
        whether anything was cut."""
        prompt, target = self.prompt_ids(question), self.answer_ids(answer)
        input_ids = (prompt + target)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels,
                "truncated": len(prompt) + len(target) > max_length}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def answer_nll(accelerator, model, dataloader) -> dict[str, float]:
    """Teacher-forced negative log-likelihood of the answer tokens: total NLL / answer tokens over the whole
    (gathered, de-duplicated) split, its exp (perplexity), and the mean per-question NLL sum."""
    model.eval()
    per_example = []
    for batch in tqdm(dataloader, desc="Answer NLL", disable=not accelerator.is_local_main_process, leave=False):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            del logits
            stats = torch.stack([nll.sum(1), (labels != IGNORE_INDEX).sum(1).float()], dim=1)  # (batch, 2)
        per_example.append(accelerator.gather_for_metrics(stats).cpu())
    stats = torch.cat(per_example).double()
    tokens = stats[:, 1].sum().item()
    nll = stats[:, 0].sum().item() / max(tokens, 1)
    return {"answer_nll": nll, "answer_perplexity": float(torch.tensor(nll).exp()),
            "answer_nll_per_question": stats[:, 0].mean().item(), "answer_tokens": int(tokens),
            "nll_samples": len(stats)}


def generate_answers(accelerator, model, tokenizer, formatter: PromptFormatter, questions: list[str],
                     references: list[str], batch_size: int, max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy generation (one beam, no sampling; other settings of the model's generation_config, such as a
    repetition_penalty, still apply) for every question, split between the processes (each example on exactly one),
    in batches of similar prompt length with left padding, stopping at `formatter.stop_ids`; gathered on every
    process, in question order."""
    model = accelerator.unwrap_model(model)
    model.eval()
    prompts = [formatter.prompt_ids(q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # little padding per batch
    records = []
    with accelerator.split_between_processes(order) as mine:
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        for indices in tqdm(batches, desc="Generating", disable=not accelerator.is_local_main_process, leave=False):
            inputs = tokenizer.pad({"input_ids": [prompts[i] for i in indices]}, padding=True, return_tensors="pt",
                                   padding_side="left").to(accelerator.device)
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=formatter.stop_ids)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(indices, texts):
                prediction, reference = extract_answer(text), extract_answer(references[i])
                records.append({"index": i, "question": questions[i], "generation": text, "prediction": prediction,
                                "reference": reference, "correct": prediction is not None and prediction == reference})
    return sorted(gather_object(records), key=lambda r: r["index"])


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="Causal LM to fine-tune (--no_inher) or to inherit from (a Hub id or a folder).")
    parser.add_argument("--gguf_file", type=str, default=None,
                        help="Load this GGUF file of --model_name_or_path (dequantised, as transformers does).")
    parser.add_argument("--torch_dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the model (and of the KD teacher).")
    parser.add_argument("--data_dir", type=str, default=None,
                        help="Folder with train.jsonl/test.jsonl; default: the Hub dataset openai/gsm8k (main).")
    parser.add_argument("--max_length", type=int, default=512, help="Maximum tokens of prompt + answer.")
    parser.add_argument("--prompt_format", choices=["auto", "chat", "plain"], default="auto",
                        help="'chat': the tokenizer's chat template; 'plain': --prompt_template; 'auto': chat when "
                             "the tokenizer has a template.")
    parser.add_argument("--prompt_template", type=str, default=DEFAULT_TEMPLATE,
                        help="Plain prompt, with '{question}'.")
    parser.add_argument("--system_prompt", type=str, default=None,
                        help="System turn for the chat template (default: the template's own default).")
    parser.add_argument("--keep_calculator_annotations", action="store_true",
                        help="Keep GSM8K's '<<a*b=c>>' calculator traces in the training answers.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training examples.")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="Use the first N test examples (answer NLL and exact match).")
    parser.add_argument("--max_generation_samples", type=int, default=None,
                        help="Exact match on only the first N of the evaluated test examples (default: all).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Generation limit for exact match.")
    parser.add_argument("--generation_batch_size", type=int, default=16, help="Prompts per generate() call.")
    add_training_args(parser, learning_rate=5e-5)
    add_inher_args(parser)
    add_kd_args(parser, alpha=0.5, temperature=1.0)
    args = parser.parse_args(argv)
    try:
        check_common_args(args, parser, "teacher" if args.no_inher else "inherited")
        for flag in ("max_length", "max_new_tokens", "generation_batch_size"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
        for flag in ("max_train_samples", "max_eval_samples"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
        if args.max_generation_samples is not None and args.max_generation_samples < 0:
            raise ValueError(f"--max_generation_samples must be >= 0 (0: no exact match), got "
                             f"{args.max_generation_samples}.")
    except ValueError as err:
        parser.error(str(err))
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).absolute().name
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def load_causal_lm(path: str, gguf_file: Optional[str], dtype: str):
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as err:
        raise Gsm8kRecipeError(f"cannot load the causal LM {path!r}"
                               f"{f' (gguf_file {gguf_file})' if gguf_file else ''}: {err}") from err
    if gguf_file:  # transformers dequantises GGUF weights but keeps a (non-serializable) gguf quantizer attached
        if not all(p.is_floating_point() for p in model.parameters()):
            raise Gsm8kRecipeError(f"{gguf_file}: not every weight was dequantised; cannot train it.")
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_teacher(args: argparse.Namespace, student, tokenizer):
    """The frozen KD teacher: `--teacher_name_or_path` (same vocabulary required), else a copy of the dense model
    before inheritance (exactly the model inherited from, same dtype)."""
    if args.teacher_name_or_path is None:
        return copy.deepcopy(student).eval().requires_grad_(False)
    teacher, teacher_tokenizer = load_causal_lm(args.teacher_name_or_path, None, args.torch_dtype)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise Gsm8kRecipeError(f"the KD teacher {args.teacher_name_or_path!r} has a different vocabulary from "
                               f"{args.model_name_or_path!r}; token-level KD needs the same tokenizer.")
    if teacher.get_output_embeddings().weight.shape[0] != student.get_output_embeddings().weight.shape[0]:
        raise Gsm8kRecipeError(f"the KD teacher {args.teacher_name_or_path!r} has "
                               f"{teacher.get_output_embeddings().weight.shape[0]} output logits, the student "
                               f"{student.get_output_embeddings().weight.shape[0]}.")
    return teacher.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    wall_start = time.perf_counter()
    use_kd = not args.no_inher and (args.kd_alpha > 0 or args.kd_hidden_weight > 0)
    inher_config = None
    if not args.no_inher:
        try:
            inher_config = inher_config_from_args(args, task_type="CAUSAL_LM")
        except (TypeError, ValueError) as err:
            raise Gsm8kRecipeError(f"bad inheritance options: {err}") from err
    raw = load_gsm8k(args.data_dir)
    resume_path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)

    accelerator = build_accelerator(args)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = create_hub_repo(accelerator, args)
    model, tokenizer = load_causal_lm(args.model_name_or_path, args.gguf_file, args.torch_dtype)
    formatter = PromptFormatter(tokenizer, args.prompt_format, args.prompt_template, args.system_prompt,
                                args.keep_calculator_annotations)
    teacher = load_teacher(args, model, tokenizer) if use_kd else None
    if teacher is not None:
        teacher.to(accelerator.device)
    if args.kd_hidden_weight > 0:
        try:
            check_hidden_states_match(model.config, teacher.config)
        except ValueError as err:
            raise Gsm8kRecipeError(str(err)) from err

    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples is not None:
        raw["test"] = raw["test"].select(range(min(args.max_eval_samples, len(raw["test"]))))

    def preprocess(examples):
        encoded = [formatter.encode(q, a, args.max_length) for q, a in zip(examples["question"], examples["answer"])]
        return {key: [e[key] for e in encoded] for key in ("input_ids", "attention_mask", "labels", "truncated")}

    with accelerator.main_process_first():
        processed = raw.map(preprocess, batched=True, remove_columns=["question", "answer"], desc="Tokenizing")
    for split, effect in (("train", "not learnt"), ("test", "not scored by the answer NLL")):
        truncated = sum(processed[split]["truncated"])
        if truncated:
            accelerator.print(f"warning: {truncated} {split} example(s) are longer than --max_length "
                              f"{args.max_length} and are cut: the end of their answers is {effect}.")
    processed = processed.remove_columns("truncated")
    for split in ("train", "test"):  # a prompt that fills --max_length leaves no answer token to learn or score
        before = len(processed[split])
        processed[split] = processed[split].filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]))
        if len(processed[split]) < before:
            accelerator.print(f"warning: {before - len(processed[split])} {split} example(s) keep no answer token "
                              f"within --max_length {args.max_length} (the prompt fills it) and are left out.")
        if not len(processed[split]):
            raise Gsm8kRecipeError(f"no {split} example keeps an answer token within --max_length {args.max_length}; "
                                   f"raise --max_length.")
    multiple = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=multiple)
    train_dataloader = DataLoader(processed["train"], shuffle=True, collate_fn=collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloaders = {"test": DataLoader(processed["test"], collate_fn=collator,
                                           batch_size=args.per_device_eval_batch_size)}

    dense_params = model.num_parameters()
    if inher_config is not None:
        model = inherit_for_training(accelerator, model, inher_config, processed["train"], collator, args)
    total_params, trainable_params = param_counts(model)

    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay)
    model, optimizer, train_dataloader, eval_dataloaders, lr_scheduler, plan = prepare_training(
        accelerator, model, optimizer, train_dataloader, eval_dataloaders, args)
    loss_fn = DistillationLoss(teacher, args.kd_alpha if use_kd else 0.0, args.kd_temperature, kind="kl",
                               token_level=True, ignore_index=IGNORE_INDEX, autocast=accelerator.autocast,
                               hidden_weight=args.kd_hidden_weight if use_kd else 0.0)
    accelerator.print(f"gsm8k: {len(processed['train'])} train / {len(processed['test'])} test examples; "
                      f"{plan.max_train_steps} optimizer steps of {plan.total_batch_size} examples "
                      f"({plan.num_train_epochs} epoch(s)); {'inherited' if inher_config else 'dense'} model with "
                      f"{total_params:,} params; KD {'on' if use_kd else 'off'}; "
                      f"prompt format {'chat' if formatter.chat else 'plain'}")
    result = train(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, plan, args.output_dir,
                   checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=resume_path,
                   max_grad_norm=args.max_grad_norm, eval_fn=lambda: answer_nll(accelerator, model,
                                                                                eval_dataloaders["test"]),
                   eval_steps=args.eval_steps, seed=args.seed, with_tracking=args.with_tracking, project_name="gsm8k",
                   tracker_args=args, count_items=lambda batch: count_target_tokens(batch, IGNORE_INDEX))

    generation_start = time.perf_counter()
    count = len(raw["test"]) if args.max_generation_samples is None else min(args.max_generation_samples,
                                                                             len(raw["test"]))
    records = generate_answers(accelerator, model, tokenizer, formatter, raw["test"]["question"][:count],
                               raw["test"]["answer"][:count], args.generation_batch_size, args.max_new_tokens)
    generation_time = time.perf_counter() - generation_start
    metrics = dict(result.eval_metrics)
    # evaluate's exact match of the normalised final answers; a generation without a number never matches.
    metrics["exact_match"] = load_metric("exact_match").compute(
        predictions=[r["prediction"] if r["prediction"] is not None else "" for r in records],
        references=[r["reference"] for r in records])["exact_match"] if records else float("nan")
    metrics["generation_samples"] = len(records)
    accelerator.print(f"exact match {metrics['exact_match']:.4f} on {len(records)} test questions "
                      f"({generation_time:.0f} s)")
    if args.with_tracking and records:
        accelerator.log({"eval_exact_match": metrics["exact_match"]}, step=result.completed_steps)
    if accelerator.is_main_process:
        with open(Path(args.output_dir) / "predictions.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    results = run_results(accelerator, result, metrics, total_params, trainable_params, dense_params,
                          len(processed["train"]), wall_start)
    results.update({"inherited": inher_config is not None, "kd": use_kd,
                    "generation_runtime": round(generation_time, 3)})
    card_metrics = {k: metrics[k] for k in ("answer_nll", "answer_perplexity", "exact_match")}
    finish_run(accelerator, args, model, tokenizer, results, card_metrics, f"{HUB_DATASET}/{HUB_CONFIG}", repo_id)
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        return run(args)
    except (Gsm8kRecipeError, CheckpointError, NonFiniteLossError, TrackingError) as err:
        sys.exit(f"gsm8k.py: error: {err}")


if __name__ == "__main__":
    main()
