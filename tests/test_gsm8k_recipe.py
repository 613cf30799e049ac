"""recipes/gsm8k.py: the answer extractor on real GSM8K answers and messy generations, prompt/label construction,
answer NLL against the model's own loss, bad inputs, and an end-to-end `accelerate launch` run on the real
SmolLM2-135M-Instruct (GGUF) with real GSM8K JSONL ($INHERNET_DATA_DIR/gsm8k, default ../shared/data/gsm8k)."""

import copy
import json
import shlex
import subprocess
import sys

import pytest
import torch

from recipes import DATA_DIR, RECIPES, launch, load_recipe, results
from reference import SMOLLM2_GGUF, safetensors_equal, smollm2_dir, tiny_llama

GSM8K = DATA_DIR / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(),
                                 reason=f"GSM8K JSONL not found under {GSM8K}: set INHERNET_DATA_DIR")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("gsm8k")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


# ------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ------------------------------------------------------------------------------------------------------------------


@needs_gsm8k
def test_extractor_on_every_real_gsm8k_answer(recipe):
    """Every reference answer of both splits: the number after '####', commas removed (79 train answers have
    thousands separators, e.g. '#### 1,080'); the reasoning before it holds other numbers that must not win."""
    checked = with_commas = 0
    for split in ("train", "test"):
        for line in (GSM8K / f"{split}.jsonl").read_text().splitlines():
            answer = json.loads(line)["answer"]
            final = answer.split("####")[-1].strip()
            assert recipe.extract_answer(answer) == final.replace(",", ""), answer
            checked += 1
            with_commas += "," in final
    assert checked == 7473 + 1319 and with_commas > 0


def test_extractor_on_real_answer_strings(recipe):
    janet = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at "
             "the farmer\u2019s market.\n#### 18")
    assert recipe.extract_answer(janet) == "18"
    house = ("The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased "
             "the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is "
             "120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of 200,000-130,000=$<<200000-130000="
             "70000>>70,000\n#### 70000")
    assert recipe.extract_answer(house) == "70000"


@pytest.mark.parametrize("text, expected", [
    ("So she makes $18 every day.\n#### 18<|im_end|>", "18"),
    ("#### $1,234.50", "1234.5"),
    ("The answer is 18.00.", "18"),
    ("He made a profit of $70,000.", "70000"),
    ("The temperature dropped to -3 degrees.", "-3"),
    ("####18", "18"),
    ("#### 0.50 dollars", "0.5"),
    ("#### 100", "100"),                                      # trailing zeros of an integer stay
    ("First 5 + 7 = 12, then 12 * 3 = 36 apples", "36"),      # no marker: the last number
    ("#### 7\n\nQuestion: Tom has 3 apples...\nAnswer: #### 3", "7"),  # rambling after the first answer
    ("####\nThe result is 42", "42"),                         # marker without a number: fall back
    ("I cannot solve this.", None),
    ("", None),
    ("It takes 2/2=1 bolt of white fiber, so 2+1=3 in total. The answer is 3.", "3"),
    ("Total: 1,000,000 grains", "1000000"),
    ("The list 1,2,3 has 3 items", "3"),
    ("It takes between 3-4 hours", "4"),                      # a range dash is not a minus sign
    ("from 5-10 dollars", "10"),
    ("so x=-2", "-2"),
    ("about .5 of it", None),                                 # no digit before the point: not 5
    ("#### -$5", "-5"),                                       # a minus before the currency sign
    ("The answer is \u22124.", "-4"),                          # U+2212, the typographic minus
    ("It takes 3\u22124 hours", "4"),                           # ... which is a range dash between numbers too
])
def test_extractor_on_messy_generations(recipe, text, expected):
    assert recipe.extract_answer(text) == expected


# ------------------------------------------------------------------------------------------------------------------
# Prompts and labels
# ------------------------------------------------------------------------------------------------------------------


def test_chat_prompt_masks_the_prompt_and_ends_the_answer(recipe, smollm2_tokenizer):
    tok = smollm2_tokenizer
    formatter = recipe.PromptFormatter(tok)  # auto -> chat (SmolLM2 has a template)
    assert formatter.chat
    example = formatter.encode("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5", max_length=512)
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    answer = tok("2+3=5\n#### 5", add_special_tokens=False)["input_ids"]  # calculator trace stripped
    assert example["input_ids"] == prompt + answer + [tok.eos_token_id]
    assert example["labels"] == [-100] * len(prompt) + answer + [tok.eos_token_id]
    assert tok.decode(example["input_ids"]).endswith("<|im_start|>assistant\n2+3=5\n#### 5<|im_end|>")
    kept = recipe.PromptFormatter(tok, keep_calculator_annotations=True).encode("q", "2+3=<<2+3=5>>5", 512)
    assert "<<2+3=5>>" in tok.decode(kept["input_ids"])
    short = formatter.encode("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5", max_length=len(prompt) + 2)
    assert short["labels"] == [-100] * len(prompt) + answer[:2] and len(short["input_ids"]) == len(prompt) + 2


def test_chat_answers_end_with_the_templates_end_of_turn_not_eos(recipe, smollm2_tokenizer):
    """A tokenizer whose eos is not its template's end of turn (as Qwen2.5 base: eos '<|endoftext|>', turns end
    with '<|im_end|>'): answers end with '<|im_end|>', and generation stops at either."""
    tok = copy.deepcopy(smollm2_tokenizer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert recipe.PromptFormatter(tok).end_ids == [im_end] == [tok.eos_token_id]  # SmolLM2: the same token
    tok.eos_token = "<|endoftext|>"
    formatter = recipe.PromptFormatter(tok)
    assert tok.eos_token_id != im_end and formatter.end_ids == [im_end]
    assert formatter.stop_ids == sorted({tok.eos_token_id, im_end})
    example = formatter.encode("What is 2+3?", "#### 5", max_length=512)
    assert example["labels"][-1] == im_end and tok.eos_token_id not in example["input_ids"]
    assert recipe.PromptFormatter(tok, "plain").end_ids == [tok.eos_token_id]  # no template: eos ends the answer


def test_truncated_is_set_only_when_something_is_cut(recipe, smollm2_tokenizer):
    formatter = recipe.PromptFormatter(smollm2_tokenizer)
    full = len(formatter.encode("What is 2+3?", "#### 5", max_length=512)["input_ids"])
    assert not formatter.encode("What is 2+3?", "#### 5", max_length=full)["truncated"]
    assert formatter.encode("What is 2+3?", "#### 5", max_length=full - 1)["truncated"]


def test_prompt_flags_the_format_does_not_use_are_refused(recipe, smollm2_tokenizer):
    with pytest.raises(recipe.Gsm8kRecipeError, match="--prompt_template is used only by the plain prompt format"):
        recipe.PromptFormatter(smollm2_tokenizer, "auto", template="Q: {question}\nA:")
    with pytest.raises(recipe.Gsm8kRecipeError, match="--system_prompt is a chat-template turn"):
        recipe.PromptFormatter(smollm2_tokenizer, "plain", system_prompt="Solve step by step.")
    chat = recipe.PromptFormatter(smollm2_tokenizer, system_prompt="Solve step by step.")
    assert "Solve step by step." in chat.prompt_text("q")


def test_plain_prompt_and_format_errors(recipe, smollm2_tokenizer):
    tok = smollm2_tokenizer
    plain = recipe.PromptFormatter(tok, "plain")
    assert plain.prompt_text("Why?") == "Question: Why?\nAnswer:"
    example = plain.encode("Why?", "Because.\n#### 1", 512)
    n_prompt = example["labels"].count(-100)
    assert tok.decode(example["input_ids"][:n_prompt]) == "Question: Why?\nAnswer:"
    assert tok.decode(example["input_ids"][n_prompt:]) == " Because.\n#### 1<|im_end|>"
    with pytest.raises(recipe.Gsm8kRecipeError, match=r"\{question\}"):
        recipe.PromptFormatter(tok, "plain", template="Q: A:")
    tok_without_template = type("NoTemplate", (), {"chat_template": None, "eos_token_id": 2})()
    with pytest.raises(recipe.Gsm8kRecipeError, match="no chat template"):
        recipe.PromptFormatter(tok_without_template, "chat")
    assert not recipe.PromptFormatter(tok_without_template, "auto").chat


# ------------------------------------------------------------------------------------------------------------------
# Answer NLL
# ------------------------------------------------------------------------------------------------------------------


def test_answer_nll_equals_the_models_own_loss(recipe):
    """Per-token NLL over the answer tokens of all batches = the model's mean cross-entropy on the same labels
    (computed on the concatenation: one batch holding every example)."""
    from accelerate import Accelerator

    model = tiny_llama(vocab_size=50).eval()
    ids = torch.randint(0, 50, (5, 9))
    labels = ids.clone()
    labels[:, :4] = -100                    # prompts
    labels[1, 7:] = -100                    # padding
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": mask[i:i + 2], "labels": labels[i:i + 2]}
               for i in range(0, 5, 2)]
    metrics = recipe.answer_nll(Accelerator(cpu=True), model, batches)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert metrics["answer_nll"] == pytest.approx(expected, rel=1e-5)
    assert metrics["answer_perplexity"] == pytest.approx(float(torch.tensor(expected).exp()), rel=1e-5)
    assert metrics["answer_tokens"] == int((labels[:, 1:] != -100).sum()) and metrics["nll_samples"] == 5


def test_token_level_kd_with_the_hidden_state_term():
    """The recipe's loss for an inherited causal LM: (1 - a) CE + a KL on the answer tokens + b * hidden_state_loss on
    every attended token (Llama's last hidden state is after the final norm, in both models)."""
    from inhernet_hf import InherConfig, get_inher_model
    from inhernet_hf.distill import DistillationLoss, hidden_state_loss, kd_kl_loss

    teacher = tiny_llama(vocab_size=50).eval()
    student = get_inher_model(tiny_llama(vocab_size=50), InherConfig(r=8, num_heads=2), progressbar=False).eval()
    ids = torch.randint(0, 50, (2, 9))
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[:, :4] = -100
    labels[1, 7:], mask[1, 7:] = -100, 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss_fn = DistillationLoss(teacher, alpha=0.5, temperature=1.0, token_level=True, hidden_weight=0.3)
    loss, logs = loss_fn(student, batch)
    with torch.no_grad():
        s = student(**batch, output_hidden_states=True)
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    answer = labels[:, 1:] != -100
    kd = kd_kl_loss(s.logits[:, :-1][answer], t.logits[:, :-1][answer], 1.0)
    hidden = hidden_state_loss(s.hidden_states, t.hidden_states, mask)
    assert len(s.hidden_states) == 3 and hidden > 0  # embeddings + 2 layers; the inherited layers differ
    assert logs["kd_loss"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert logs["hidden_loss"].item() == pytest.approx(hidden.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.5 * s.loss + 0.5 * kd + 0.3 * hidden).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Bad input (before any model is loaded)
# ------------------------------------------------------------------------------------------------------------------


def test_missing_files_and_bad_jsonl(recipe, tmp_path, capsys):
    base = ["--model_name_or_path", "unused", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"missing .*train.jsonl.*test.jsonl"):
        recipe.main([*base, "--data_dir", str(tmp_path)])
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "test.jsonl").write_text('{"question": "q", "solution": "a"}\n')
    with pytest.raises(SystemExit, match=r"test.jsonl:1 needs the string keys \['question', 'answer'\].*"
                                         r"\['answer'\]"):
        recipe.main([*base, "--data_dir", str(tmp_path)])
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "a"\n')
    with pytest.raises(SystemExit, match="test.jsonl:1 is not valid JSON"):
        recipe.main([*base, "--data_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="bad inheritance options"):
        recipe.main([*base, "--data_dir", str(tmp_path), "--inher_num_heads", "0"])
    with pytest.raises(SystemExit):
        recipe.parse_args([*base, "--max_new_tokens", "0"])
    assert "--max_new_tokens must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([*base, "--max_eval_samples", "0"])
    assert "--max_eval_samples must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([*base, "--no_inher", "--kd_hidden_weight", "1"])
    assert "--no_inher trains the teacher without distillation: remove --kd_hidden_weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.parse_args([*base, "--inher_init", "svd", "--inher_calibration_samples", "16"])
    assert "--inher_calibration_samples is used only by --inher_init whitened" in capsys.readouterr().err
    recipe.parse_args([*base, "--inher_init", "whitened", "--inher_calibration_samples", "16"])


def test_examples_whose_prompt_fills_max_length_are_left_out(recipe, smollm2_tokenizer, tmp_path, capsys):
    """A prompt as long as --max_length leaves no answer token (all labels -100: a NaN loss); such examples are left
    out with a warning, and a split left empty is an error."""
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    long = " ".join(["How many apples are left after all of these trades?"] * 12)
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}, {"question": long, "answer": "#### 1"}]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = ["--model_name_or_path", str(model_dir), "--data_dir", str(data), "--max_train_steps", "1",
            "--inher_r", "4", "--kd_alpha", "0", "--max_generation_samples", "0", "--per_device_train_batch_size", "2"]
    r = recipe.main([*base, "--max_length", "40", "--output_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "1 train example(s) keep no answer token within --max_length 40" in printed
    assert ("2 test example(s) are longer than --max_length 40 and are cut: the end of their answers is not scored "
            "by the answer NLL") in printed
    assert r["train_samples"] == 1 and r["train_steps"] == 1 and r["eval_nll_samples"] == 1
    with pytest.raises(SystemExit, match="no train example keeps an answer token within --max_length 8"):
        recipe.main([*base, "--max_length", "8", "--output_dir", str(tmp_path / "out8")])


# ------------------------------------------------------------------------------------------------------------------
# End to end: real SmolLM2-135M-Instruct (GGUF) through accelerate launch
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_gsm8k
def test_inherit_distil_generate_save_reload_resume_end_to_end(recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import inhernet_hf  # noqa: F401  (AutoModelForCausalLM loads inherited checkpoints)

    out = tmp_path / "inher"
    args = ["--model_name_or_path", smollm2_dir(), "--gguf_file", SMOLLM2_GGUF, "--data_dir", GSM8K,
            "--max_train_samples", "8", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--learning_rate", "1e-5", "--max_eval_samples", "6", "--max_new_tokens", "24",
            "--generation_batch_size", "4", "--inher_target_ratio", "0.8", "--inher_num_heads", "2",
            "--inher_init", "svd", "--kd_alpha", "0.5", "--with_tracking", "--report_to", "tensorboard"]
    launch("gsm8k", args, out, timeout=600)
    r = results(out)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    exact_match = events.Scalars("eval_exact_match")
    assert [(e.step, e.value) for e in exact_match] == [(2, pytest.approx(r["eval_exact_match"]))]
    assert r["inherited"] and r["kd"] and r["train_steps"] == 2 and r["train_samples"] == 8
    assert r["eval_nll_samples"] == 6 and r["eval_generation_samples"] == 6
    assert r["eval_answer_nll"] > 0 and r["eval_answer_perplexity"] == pytest.approx(
        torch.tensor(r["eval_answer_nll"]).exp().item(), rel=1e-5)
    assert r["total_params"] < r["dense_params"]
    assert (out / "step_1").is_dir() and (out / "step_2").is_dir()
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [rec["index"] for rec in records] == list(range(6))
    assert r["eval_exact_match"] == sum(rec["correct"] for rec in records) / 6
    assert all(rec["prediction"] == recipe.extract_answer(rec["generation"]) for rec in records)

    # The saved model is a plain transformers checkpoint; its greedy generations are the recorded ones.
    from accelerate import Accelerator

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    again = recipe.generate_answers(Accelerator(cpu=True), model, tok, recipe.PromptFormatter(tok),
                                    [rec["question"] for rec in records],
                                    [json.loads(line)["answer"] for line in
                                     (GSM8K / "test.jsonl").read_text().splitlines()[:6]], 4, 24)
    assert again == records

    # Resumed from the step-1 checkpoint (model, optimizer, scheduler, RNG, data position): the same final model.
    resumed = tmp_path / "resumed"
    launch("gsm8k", [*args, "--resume_from_checkpoint", str(out / "step_1")], resumed, timeout=600)
    assert results(resumed)["resumed_from"].endswith("step_1")
    assert results(resumed)["eval_answer_nll"] == r["eval_answer_nll"]
    assert safetensors_equal(resumed / "model.safetensors", out / "model.safetensors")


# The recipe as gsm8k_table.py launches it, replaced by a script that records its arguments and writes the results
# the table reads: the test checks which flags each run of the table gets, in which order.
RECORDING_LAUNCHER = """import json, sys, pathlib
args = sys.argv[2:]
out = pathlib.Path(args[args.index('--output_dir') + 1]); out.mkdir(parents=True, exist_ok=True)
nll = 1.0 if '--no_inher' in args else 1.25
(out / 'all_results.json').write_text(json.dumps({'args': args, 'eval_answer_nll': nll, 'eval_answer_perplexity': 1.0,
    'eval_exact_match': 0.0, 'eval_generation_samples': 4, 'total_params': 10, 'wall_time': 1.0}))"""


@pytest.mark.parametrize("kd_teacher", ["base", "dense_finetune"])
def test_gsm8k_table_runs_and_kd_teacher(tmp_path, kd_teacher):
    """gsm8k_table.py: dense first, then per ratio the InherNet run without KD and the one with KD; with
    --kd_teacher dense_finetune the KD runs (only they) distil from the table's dense fine-tune."""
    launcher = shlex.join([sys.executable, "-c", RECORDING_LAUNCHER])
    done = subprocess.run([sys.executable, str(RECIPES / "gsm8k_table.py"), "--model_name_or_path", "some/model",
                           "--target_ratios", "0.8", "--num_heads", "1", "--kd_teacher", kd_teacher,
                           "--output_root", str(tmp_path), "--launcher", launcher],
                          capture_output=True, text=True, check=True)
    table = json.loads((tmp_path / "gsm8k_table.json").read_text())
    assert [row["run"] for row in table] == ["dense fine-tune", "InherNet 0.8", "InherNet 0.8 + KD"]
    args = {row["run"]: row["results"]["args"] for row in table}
    for run, flags in args.items():
        distils_from_dense = run.endswith("+ KD") and kd_teacher == "dense_finetune"
        assert ("--teacher_name_or_path" in flags) == distils_from_dense
        if distils_from_dense:
            assert flags[flags.index("--teacher_name_or_path") + 1] == str(tmp_path / "dense")
    assert args["InherNet 0.8"][args["InherNet 0.8"].index("--kd_alpha") + 1] == "0"
    assert "| InherNet 0.8 + KD | 1.2500 | +25.0% |" in done.stdout


def test_table_reuses_only_runs_made_with_the_same_flags(tmp_path):
    """A second table run with the same flags launches nothing and reports the stored commands; other flags on the
    same folders are refused before anything runs; --overwrite redoes the runs with the new flags."""
    launcher = shlex.join([sys.executable, "-c", RECORDING_LAUNCHER])

    def table(*flags, root=tmp_path, cwd=None):
        return subprocess.run([sys.executable, str(RECIPES / "gsm8k_table.py"), "--model_name_or_path", "some/model",
                               "--target_ratios", "0.8", "--num_heads", "1", "--output_root", str(root),
                               "--launcher", launcher, *flags], capture_output=True, text=True, cwd=cwd)

    first = table()
    assert first.returncode == 0 and first.stdout.count("$ ") == 3
    commands = [row["command"] for row in json.loads((tmp_path / "gsm8k_table.json").read_text())]
    again = table(root=tmp_path.name, cwd=tmp_path.parent)  # the same folders, named by a relative path
    assert again.returncode == 0 and "$ " not in again.stdout
    assert [row["command"] for row in json.loads((tmp_path / "gsm8k_table.json").read_text())] == commands

    other = table("--kd_alpha", "0.9")  # the dense and no-KD runs match; the KD run was made with alpha 0.5
    assert other.returncode != 0 and "$ " not in other.stdout
    assert f"{tmp_path / 'inher_0.8_kd'} holds a run made by another command" in other.stderr
    assert "--kd_alpha 0.5" in other.stderr and "--kd_alpha 0.9" in other.stderr

    assert "--kd_alpha weights the table's KD runs: it must lie in (0, 1], got 0.0" in table("--kd_alpha", "0").stderr

    redone = table("--kd_alpha", "0.9", "--overwrite")
    assert redone.returncode == 0 and redone.stdout.count("$ ") == 3
    kd_row = json.loads((tmp_path / "gsm8k_table.json").read_text())[2]
    stored_args = kd_row["results"]["args"]  # what the recording launcher received
    assert "--kd_alpha 0.9" in kd_row["command"] and stored_args[stored_args.index("--kd_alpha") + 1] == "0.9"

