"""recipes/glue.py end to end through `accelerate launch` (real MiniLM-L6, real GLUE SST-2 TSVs), and unit tests of
the shared machinery in inhernet_hf.training (KD losses, NaN stop, checkpoint resolution).

Data: $INHERNET_DATA_DIR (default: the `shared/data` folder beside the repository), holding glue/SST-2 etc.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hub_server import recording_hub
from recipes import DATA_DIR, RECIPES, REPO, TESTS, launch_script, results
from recipes import launch as launch_recipe
from recipes import load_recipe as load_recipe_file
from reference import minilm_path, safetensors_equal

pytestmark = pytest.mark.slow

GLUE = DATA_DIR / "glue"
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").is_file(),
    reason=f"GLUE TSVs not found under {GLUE}: set INHERNET_DATA_DIR to the folder holding glue/SST-2/train.tsv",
)


def launch(args, output_dir, **kwargs):
    return launch_recipe("glue", args, output_dir, **kwargs)


def load_recipe():
    return load_recipe_file("glue")


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None  # not a dependency of the package

SST2 = ["--task_name", "sst2", "--data_dir", str(GLUE), "--max_train_samples", "200", "--max_eval_samples", "201"]
TEACHER_ARGS = [*SST2, "--no_inher", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                "--learning_rate", "1e-4", "--num_train_epochs", "2"]
# 200 examples / 16 = 13 batches per epoch; accumulation 2 -> 7 optimizer steps per epoch (the last one on a single
# batch); 10 steps = 2 epochs; checkpoints at step 4 (mid epoch 0) and step 8 (epoch 1).
STUDENT_ARGS = [*SST2, "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                "--learning_rate", "3e-4", "--max_train_steps", "10", "--gradient_accumulation_steps", "2",
                "--checkpointing_steps", "4", "--inher_target_ratio", "0.5", "--inher_num_heads", "2",
                "--inher_init", "svd", "--kd_alpha", "0.5", "--kd_temperature", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The --no_inher run: MiniLM fine-tuned on 200 SST-2 examples; its output_dir is the KD teacher."""
    out = tmp_path_factory.mktemp("glue") / "teacher"
    launch([*TEACHER_ARGS, "--model_name_or_path", minilm_path()], out)
    return out


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """Inherited from the teacher (SVD, 2 heads, half the targeted parameters), distilled from it (default teacher:
    --model_name_or_path), with checkpoints, TensorBoard tracking and a push to a local Hub stand-in."""
    out = tmp_path_factory.mktemp("glue") / "student"
    tracking = ["--with_tracking", "--report_to", "tensorboard"] if HAS_TENSORBOARD else []
    with recording_hub() as hub:
        launch([*STUDENT_ARGS, "--model_name_or_path", teacher, *tracking,
                "--push_to_hub", "--hub_model_id", "me/minilm-sst2-inher"], out,
               env={**hub.env, "HF_HUB_OFFLINE": "0"})  # everything else is local; the Hub is 127.0.0.1
    return out, hub


# ------------------------------------------------------------------------------------------------------------------
# (a) end to end
# ------------------------------------------------------------------------------------------------------------------


@needs_glue
def test_teacher_then_inherited_student_end_to_end(teacher, student):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from inhernet_hf import InherModel  # importing inhernet_hf registers the layers with transformers

    t = results(teacher)
    assert not t["inherited"] and not t["kd"] and t["eval_samples"] == 201
    assert t["eval_accuracy"] > 0.55, t  # learnt something in 26 steps
    assert AutoModelForSequenceClassification.from_pretrained(teacher).config.id2label == {0: "negative", 1: "positive"}

    out, hub = student
    r = results(out)
    assert r["inherited"] and r["kd"] and r["train_steps"] == 10 and r["eval_samples"] == 201
    assert 0.0 <= r["eval_accuracy"] <= 1.0
    assert r["total_params"] < r["dense_params"] == t["total_params"] and r["trainable_params"] == r["total_params"]
    assert r["wall_time"] > r["train_runtime"] > 0
    assert {p.name for p in out.iterdir() if p.name.startswith(("step_", "epoch_", ".tmp-"))} == {"step_4", "step_8"}
    if HAS_TENSORBOARD:
        assert list((out / "glue_sst2").glob("events.out.tfevents.*")), "no TensorBoard event file"

    # The output_dir loads both ways, with the weights that were evaluated.
    recipe = load_recipe()
    dev = recipe.read_glue_tsv(recipe.GLUE_TASKS["sst2"], GLUE / "SST-2" / "dev.tsv")
    tokenizer = AutoTokenizer.from_pretrained(out)
    inherited = InherModel.from_pretrained(out).eval()
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert inherited.inher_report.ratio == pytest.approx(0.5, abs=0.01)
    correct, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched runs; 2 threads crawl when the 2 cores are shared
    with torch.no_grad():
        for start in range(0, 201, 32):
            batch = tokenizer(dev["sentence"][start:min(start + 32, 201)], padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
            logits = inherited(**batch).logits
            torch.testing.assert_close(plain(**batch).logits, logits)
            correct += (logits.argmax(-1) == torch.tensor(dev["label"][start:min(start + 32, 201)])).sum().item()
    torch.set_num_threads(threads)
    assert abs(correct / 201 - r["eval_accuracy"]) <= 1 / 201 + 1e-9  # thread-count rounding may flip a near-tie

    card = (out / "README.md").read_text()
    assert "glue/sst2" in card and "accuracy" in card
    assert "me/minilm-sst2-inher" in hub.repos
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(hub.uploaded)
    assert b"glue/sst2" in hub.uploaded["README.md"]


# ------------------------------------------------------------------------------------------------------------------
# (b) exact resumption after a kill
# ------------------------------------------------------------------------------------------------------------------


@needs_glue
def test_killed_during_checkpoint_save_then_resumed_equals_uninterrupted(teacher, student, tmp_path):
    from inhernet_hf.checkpoints import TMP_PREFIX, find_latest_checkpoint

    reference, _ = student
    out = tmp_path / "killed"
    args = [*STUDENT_ARGS, "--model_name_or_path", teacher]
    # Killed while writing the step-8 checkpoint: step_4 stays the latest complete one.
    killed = launch_script(TESTS / "kill_at_checkpoint.py", ["step_8", RECIPES / "glue.py", *args, "--output_dir", out],
                           check=False)
    assert killed.returncode != 0
    assert (out / f"{TMP_PREFIX}step_8" / "model.safetensors").is_file() and not (out / "step_8").exists()
    assert find_latest_checkpoint(out) == out / "step_4"
    assert not (out / "all_results.json").exists()

    # Resumed mid-epoch 0 (8 of 13 batches consumed): crosses the epoch boundary and redoes step 8.
    launch([*args, "--resume_from_checkpoint", "latest"], out)
    r, ref = results(out), results(reference)
    assert r["resumed_from"].endswith("step_4")
    assert r["train_steps"] == ref["train_steps"] == 10
    assert r["eval_accuracy"] == ref["eval_accuracy"]
    assert safetensors_equal(out / "model.safetensors", reference / "model.safetensors")
    assert safetensors_equal(out / "step_8" / "model.safetensors", reference / "step_8" / "model.safetensors")
    assert not (out / f"{TMP_PREFIX}step_8").exists()


@needs_glue
def test_resuming_into_another_model_or_schedule_is_refused(teacher, student, tmp_path, capsys):
    """A checkpoint records its model's parameter shapes and its run's length: resuming it with other --inher_* flags
    or another --max_train_steps is a clear error before any step (not a size mismatch inside load_state, not a
    silently different schedule)."""
    reference, _ = student
    args = [*STUDENT_ARGS, "--model_name_or_path", teacher, "--inher_num_heads", "3",
            "--resume_from_checkpoint", reference / "step_4"]
    message = _fail(args, tmp_path, capsys)
    assert f"Cannot resume from {reference / 'step_4'}: it holds a model of" in message
    assert "other --inher_* or --student_* flags" in message
    # Another length: the lr schedule's horizon would change, so the result could not equal an uninterrupted run.
    message = _fail([*STUDENT_ARGS, "--model_name_or_path", teacher, "--max_train_steps", "12",
                     "--resume_from_checkpoint", reference / "step_4"], tmp_path, capsys)
    assert "set up differently (max_train_steps: checkpoint 10 vs now 12)" in message


# ------------------------------------------------------------------------------------------------------------------
# (b2) the students-vs-InherNet comparison (recipes/compare.py) on the same teacher
# ------------------------------------------------------------------------------------------------------------------


@needs_glue
def test_compare_students_and_inhernet_at_equal_size(teacher, tmp_path):
    """compare.py end to end (CI-sized): the teacher row, a 3-layer student with HCD, InherNet matched to it; one
    seed, 64 examples, 4 steps; the convergence column is read from the evaluation at step 1 (25% of 4)."""
    command = [sys.executable, str(REPO / "recipes" / "compare.py"), "--task_name", "sst2",
               "--teacher_name_or_path", str(teacher), "--data_dir", str(GLUE), "--student_num_layers", "3",
               "--methods", "teacher", "student_hcd", "inher", "--seeds", "1", "--max_train_samples", "64",
               "--max_eval_samples", "201", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
               "--launcher", f"{sys.executable} -m accelerate.commands.launch --cpu --num_processes 1 "
               "--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process 1",
               "--output_dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert summary["student_layers"] == 3 and summary["total_steps"] == 4 and list(rows) == ["teacher", "student_hcd",
                                                                                             "inher"]
    student, inher = results(tmp_path / "student_hcd" / "seed_1"), results(tmp_path / "inher" / "seed_1")
    assert student["student_layers"] == 3 and student["distill_method"] == "hcd" and student["training_only_params"] > 0
    assert inher["inherited"] and not inher["kd"]
    assert abs(inher["total_params"] / student["total_params"] - 1) < 0.005  # equal size
    assert rows["teacher"]["mean"] == results(teacher)["eval_accuracy"]  # evaluated only, not retrained
    for method in ("student_hcd", "inher"):
        history = results(tmp_path / method / "seed_1")["eval_history"]
        assert [h["step"] for h in history] == [1, 2, 3, 4]  # --eval_steps 1 (25% of 4 steps)
        assert rows[method]["early_mean"] == history[0]["accuracy"] and rows[method]["mean"] == history[-1]["accuracy"]
    # the student saved without HCD's training-only branches: a plain 3-layer classifier
    from safetensors import safe_open

    with safe_open(str(tmp_path / "student_hcd" / "seed_1" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("projector" in k or "mapper" in k for k in keys)
    assert max(int(k.split(".")[3]) for k in keys if k.startswith("bert.encoder.layer.")) == 2
    table, chart = (tmp_path / "compare.md").read_text().split("\n\n")
    assert table.count("\n") == 4 and chart.count("\n") == 6 and (tmp_path / "compare.png").stat().st_size > 0


def test_compare_text_chart():
    """Bars end at the mean on a scale from the lowest mean - std to the highest mean + std; ├ ┤ mark mean ± std."""
    chart = load_recipe_file("compare").text_chart([{"label": "a", "mean": 0.5, "std": 0.1},
                                                    {"label": "bb", "mean": 0.8, "std": 0.0}], width=20)
    assert chart.split("\n") == ["    0.4000         0.8000",
                                  "a   ├████─────┤           0.5000",
                                  "bb  ████████████████████  0.8000"]


COMPARE = ["--teacher_name_or_path", "t", "--output_dir", "o"]


@pytest.mark.parametrize("flags, message", [
    (["--task_name", "stsb"], "stsb is a regression, and HKT and HCD need a classification task: drop student_hkt, "
                              "student_hcd from --methods"),
    (["--task_name", "stsb", "--methods", "student", "student_hcd", "inher"],
     "drop student_hcd from --methods (e.g. --methods student inher)"),
    (["--task_name", "sst2", "--target_ratio", "0"], "--target_ratio must lie in (0, 1], got 0.0"),
    (["--task_name", "sst2", "--target_ratio", "1.5"], "--target_ratio must lie in (0, 1], got 1.5"),
    (["--task_name", "sst2", "--launcher", "accelerate launch --num_processes two"],
     "--launcher: --num_processes must be an integer >= 1, got 'two'"),
    (["--task_name", "sst2", "--launcher", "accelerate launch --config_file c.yaml --num_machines 1"],
     "--launcher: with --config_file, also give --num_processes N"),
    ([], "--recipe glue needs --task_name"),
    (["--task_name", "sst2", "--idx_dir", "d"], "--recipe glue does not use --idx_dir"),
    (["--recipe", "image_classification"], "needs its data: --idx_dir, --dataset_name or --train_dir"),
    (["--recipe", "image_classification", "--idx_dir", "d", "--methods", "student", "inher_symmetric"],
     "--recipe image_classification does not use --methods inher_symmetric"),
    (["--recipe", "image_classification", "--idx_dir", "d", "--student_num_layers", "2"],
     "--recipe image_classification does not use --student_num_layers"),
])
def test_compare_refuses_bad_arguments_before_any_run(flags, message, capsys):
    with pytest.raises(SystemExit):
        load_recipe_file("compare").parse_args([*flags, *COMPARE])
    assert message in capsys.readouterr().err


def test_compare_runs_a_regression_without_hkt_and_hcd():
    args = load_recipe_file("compare").parse_args(["--task_name", "stsb", "--methods", "teacher", "student_kd",
                                                   *COMPARE])
    assert args.methods == ["teacher", "student_kd"]


def test_compare_counts_steps_for_the_launchers_processes():
    """Steps, warmup and the 25% evaluation point are computed for the processes --launcher starts: each gets
    ceil(batches / processes) batches an epoch, as Accelerate shards them."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    compare = load_recipe_file("compare")
    processes = {launcher: compare.parse_args(["--task_name", "sst2", "--launcher", launcher, *COMPARE]).num_processes
                 for launcher in ("accelerate launch --num_processes 2 --cpu", "accelerate launch --num_processes=3",
                                  "python", "accelerate launch --num-processes 4 --config-file c.yaml")}
    assert list(processes.values()) == [2, 3, 1, 4]
    batches = BatchSamplerShard(BatchSampler(range(65), 16, drop_last=False), num_processes=2, process_index=0)
    assert compare.steps_per_run(65, 16, num_epochs=2, num_processes=2) == 2 * len(batches) == 6
    assert compare.steps_per_run(65, 16, num_epochs=2, num_processes=1) == 10


# ------------------------------------------------------------------------------------------------------------------
# (c) two processes (gloo): same metric, no duplicated eval samples
# ------------------------------------------------------------------------------------------------------------------


@needs_glue
def test_two_processes_give_the_same_eval_metric(teacher, tmp_path):
    # learning_rate 0: the DDP training path (2 steps, checkpoints) runs but leaves the teacher's weights unchanged,
    # so both runs evaluate the same model on 201 examples (odd: the sharded loader pads with duplicates).
    args = [*SST2, "--model_name_or_path", teacher, "--no_inher", "--learning_rate", "0", "--max_train_steps", "2",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--checkpointing_steps", "1"]
    launch(args, tmp_path / "p1", num_processes=1)
    launch(args, tmp_path / "p2", num_processes=2)
    one, two = results(tmp_path / "p1"), results(tmp_path / "p2")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["eval_samples"] == two["eval_samples"] == 201
    assert one["eval_accuracy"] == two["eval_accuracy"] == results(teacher)["eval_accuracy"]
    assert {p.name for p in (tmp_path / "p2" / "step_2").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl",
                                                                      "inhernet_trainer_state.json"}


@needs_glue
def test_bf16_mixed_precision_trains_the_inherited_model(teacher, tmp_path):
    """`accelerate launch --mixed_precision bf16` (CPU autocast) on the inherited MiniLM, whose projections carry
    biases: it trains with a finite loss, and its evaluation agrees with the float32 run of the same two steps."""
    args = [*SST2, "--model_name_or_path", teacher, "--inher_target_ratio", "0.5", "--kd_alpha", "0.5",
            "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32"]
    launch(args, tmp_path / "fp32")
    launch(args, tmp_path / "bf16", mixed_precision="bf16")
    fp32, bf16 = results(tmp_path / "fp32"), results(tmp_path / "bf16")
    assert math.isfinite(bf16["train_loss"]) and bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)
    assert abs(bf16["eval_accuracy"] - fp32["eval_accuracy"]) <= 4 / 201  # bf16 rounding flips a few of 201


# ------------------------------------------------------------------------------------------------------------------
# (d) distillation losses against hand-computed values
# ------------------------------------------------------------------------------------------------------------------


def test_hinton_kd_loss_hand_computed():
    from inhernet_hf.distill import distillation_loss, kd_kl_loss

    student_logits, teacher_logits = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    # T = 2: p_t = softmax([1.5, 1, .5]), p_s = softmax([.5, 1, 1.5]) = reversed p_t, so
    # KL(p_t || p_s) = p_t0 * ln(e) + p_t1 * 0 + p_t2 * ln(1/e) = (e^1.5 - e^0.5) / (e^1.5 + e + e^0.5).
    e = math.exp
    kl = (e(1.5) - e(0.5)) / (e(1.5) + e(1.0) + e(0.5))
    assert kd_kl_loss(student_logits, teacher_logits, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    # CE of label 0 under the student: -log(e^1 / (e^1 + e^2 + e^3)) = log(1 + e + e^2).
    ce = math.log(1 + e(1.0) + e(2.0))
    hard = nn.functional.cross_entropy(student_logits, torch.tensor([0]))
    total, soft = distillation_loss(student_logits, teacher_logits, hard, alpha=0.5, temperature=2.0)
    assert soft.item() == pytest.approx(4 * kl, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * ce + 0.5 * 4 * kl, rel=1e-6)
    assert total.item() == pytest.approx(1.844116, abs=1e-6)  # 0.5 * 2.407606 + 0.5 * 4 * 0.320157
    # alpha = 0 is the plain task loss; identical logits give no KD term.
    assert distillation_loss(student_logits, teacher_logits, hard, alpha=0.0)[0].item() == pytest.approx(ce)
    assert kd_kl_loss(teacher_logits, teacher_logits, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_regression_kd_is_mse_on_logits():
    from inhernet_hf.distill import distillation_loss

    student_logits, teacher_logits = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [1.0]])
    hard = torch.tensor(0.3)
    total, soft = distillation_loss(student_logits, teacher_logits, hard, alpha=0.25, temperature=5.0, kind="mse")
    assert soft.item() == pytest.approx((0.5**2 + 1.0**2) / 2)
    assert total.item() == pytest.approx(0.75 * 0.3 + 0.25 * 0.625)


def test_token_level_kd_uses_only_answer_tokens():
    """The causal-LM use: logits at i predict token i+1, and only positions whose next label is not -100 count."""
    from types import SimpleNamespace

    from inhernet_hf.distill import DistillationLoss, kd_kl_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 4, 1, -100], [-100, 3, 3, 2, 6]])
    mask = labels[:, 1:] != -100  # positions 1, 2 of row 0; 0..3 of row 1
    per_token = [kd_kl_loss(s[b, i:i + 1], t[b, i:i + 1], 2.0).item() for b in range(2) for i in range(4) if mask[b, i]]
    expected = sum(per_token) / len(per_token)
    assert kd_kl_loss(s[:, :-1], t[:, :-1], 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-6)
    # Masked-out positions do not matter at all.
    t_noisy = t.clone()
    t_noisy[0, 0] += 100.0
    assert kd_kl_loss(s[:, :-1], t_noisy[:, :-1], 2.0, mask=mask).item() == pytest.approx(expected, rel=1e-6)

    class Stub(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, labels=None):
            return SimpleNamespace(logits=self.logits, loss=None if labels is None else torch.tensor(1.5))

    loss_fn = DistillationLoss(Stub(t), alpha=0.4, temperature=2.0, token_level=True)
    loss, logs = loss_fn(Stub(s), {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels})
    assert logs["kd_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.6 * 1.5 + 0.4 * expected, rel=1e-6)


def test_hidden_state_loss_hand_computed():
    """Mean over layers (embeddings skipped) of sum ||s - t||^2 / sum ||t||^2 over the unmasked tokens."""
    from inhernet_hf.distill import hidden_state_loss

    embeddings = (torch.zeros(1, 3, 2), torch.full((1, 3, 2), 9.0))  # differ, but are not a layer's output
    t1 = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [7.0, 7.0]]])
    s1 = torch.tensor([[[3.0, 1.0], [1.0, 2.0], [0.0, 0.0]]])  # token errors 9, 4, (98: padding)
    t2 = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [5.0, 5.0]]])
    s2 = t2.clone()
    mask = torch.tensor([[1, 1, 0]])
    layer1 = (9.0 + 4.0) / (25.0 + 1.0)
    value = hidden_state_loss((embeddings[1], s1, s2), (embeddings[0], t1, t2), mask)
    assert value.item() == pytest.approx((layer1 + 0.0) / 2)
    unmasked = hidden_state_loss((embeddings[1], s1, s2), (embeddings[0], t1, t2))
    assert unmasked.item() == pytest.approx(((9.0 + 4.0 + 98.0) / (25.0 + 1.0 + 98.0) + 0.0) / 2)
    with pytest.raises(ValueError, match="the student has 1 layers and the teacher 2"):
        hidden_state_loss((embeddings[0], s1), (embeddings[0], t1, t2))
    with pytest.raises(ValueError, match=r"student's are \(1, 3, 1\), the teacher's \(1, 3, 2\)"):
        hidden_state_loss((embeddings[0], s1[..., :1]), (embeddings[0], t1))


def test_hidden_state_term_on_an_inherited_minilm():
    """DistillationLoss(hidden_weight=b) on the real MiniLM inherited at ratio 0.5: the logged term is
    hidden_state_loss of the two models' hidden states on the non-padding tokens, the loss is
    (1 - a) CE + a KL + b * term, and a few optimizer steps on it pull the student's hidden states to the teacher's."""
    import copy

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from inhernet_hf import InherConfig, get_inher_model
    from inhernet_hf.distill import DistillationLoss, hidden_state_loss, kd_kl_loss

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    student = get_inher_model(copy.deepcopy(teacher), InherConfig(target_ratio=0.5, num_heads=2),
                              progressbar=False).eval()  # eval: no dropout, so the terms are comparable
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = dict(tokenizer(["A man is playing a guitar.", "The cat sat."], ["Someone plays music.", "A dog ran."],
                           padding=True, return_tensors="pt"), labels=torch.tensor([0, 1]))
    assert batch["attention_mask"].min() == 0  # padding present: the mask matters
    loss_fn = DistillationLoss(teacher, alpha=0.3, temperature=2.0, hidden_weight=0.5)
    loss, logs = loss_fn(student, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s, t = student(**batch, output_hidden_states=True), teacher(**inputs, output_hidden_states=True)
    expected_hidden = hidden_state_loss(s.hidden_states, t.hidden_states, batch["attention_mask"])
    assert logs["hidden_loss"].item() == pytest.approx(expected_hidden.item(), rel=1e-5) and expected_hidden > 0.01
    expected = 0.7 * s.loss + 0.3 * kd_kl_loss(s.logits, t.logits, 2.0) + 0.5 * expected_hidden
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    hidden_only = DistillationLoss(teacher, alpha=0.0, hidden_weight=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    first = None
    for _ in range(5):
        loss, logs = hidden_only(student, batch)
        assert "kd_loss" not in logs and loss.item() == pytest.approx((logs["task_loss"] + logs["hidden_loss"]).item())
        first = logs["hidden_loss"].item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert hidden_only(student, batch)[1]["hidden_loss"].item() < 0.75 * first  # 0.57 -> 0.38
    for alpha, hidden_weight in ((0.0, 1.0), (0.5, 0.0)):
        with pytest.raises(ValueError, match="distil from a teacher, but none was given"):
            DistillationLoss(None, alpha=alpha, hidden_weight=hidden_weight)


# ------------------------------------------------------------------------------------------------------------------
# NaN/Inf stop and checkpoint resolution (in process, a toy model)
# ------------------------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from argparse import Namespace

    from accelerate import Accelerator, DataLoaderConfiguration
    from safetensors.torch import load_file

    from inhernet_hf.checkpoints import find_latest_checkpoint
    from inhernet_hf.training import NonFiniteLossError, build_optimizer, prepare_training, train

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    model = nn.Linear(4, 1)
    data = torch.utils.data.DataLoader([{"x": torch.randn(4)} for _ in range(12)], batch_size=2, shuffle=True)
    args = Namespace(gradient_accumulation_steps=1, max_train_steps=None, num_train_epochs=1,
                     lr_scheduler_type="linear", num_warmup_steps=0, per_device_train_batch_size=2)
    model, optimizer, data, _, scheduler, plan = prepare_training(
        accelerator, model, build_optimizer(model, 0.1), data, {}, args)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(batch["x"]).pow(2).mean()
        return (loss * float("nan") if len(calls) == 3 else loss), {}

    (tmp_path / "step_1").mkdir()  # from an earlier run in the same output_dir: replaced as a whole
    (tmp_path / "step_1" / "stale.txt").write_text("old")
    (tmp_path / ".tmp-step_2").mkdir()  # an interrupted save of an earlier run: cleaned up
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at optimizer step 3 .*step_2"):
        train(accelerator, model, optimizer, scheduler, data, loss_fn, plan, tmp_path, checkpointing_steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2"]
    assert not (tmp_path / "step_1" / "stale.txt").exists()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_2"
    saved = load_file(str(tmp_path / "step_2" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in accelerator.unwrap_model(model).state_dict().items())


def test_calibration_batches_and_checkpointing_steps():
    from argparse import ArgumentTypeError

    from inhernet_hf.flags import parse_checkpointing_steps
    from inhernet_hf.training import calibration_batches

    loader = [{"input_ids": torch.arange(8).view(4, 2) + 10 * i, "labels": torch.zeros(4)} for i in range(3)]
    batches = calibration_batches(loader, 6)  # what --inher_calibration_samples 6 passes as calibration_data
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2] and all("labels" not in b for b in batches)
    assert torch.equal(batches[1]["input_ids"], loader[1]["input_ids"][:2])
    assert parse_checkpointing_steps("epoch") == "epoch" and parse_checkpointing_steps("25") == 25
    assert parse_checkpointing_steps(None) is None
    for bad in ("0", "-3", "often"):
        with pytest.raises(ArgumentTypeError):
            parse_checkpointing_steps(bad)


def test_inher_flags_map_to_inher_config():
    from inhernet_hf.flags import inher_config_from_args

    recipe = load_recipe()
    base = ["--task_name", "sst2", "--model_name_or_path", "m", "--output_dir", "o"]

    def config_of(*flags):
        return inher_config_from_args(recipe.parse_args([*base, *flags]), "SEQ_CLS")

    # Default: the measured best, whitened init + activation ranks (calibrated on training examples).
    config = config_of()
    assert (config.r, config.target_ratio, config.num_heads, config.init, config.rank_allocation, config.task_type) == (
        None, 0.5, 2, "whitened", "activation", "SEQ_CLS")
    assert config.needs_calibration
    # The paper's data-free setting is one flag away: SVD init, uniform ranks.
    config = config_of("--inher_init", "svd")
    assert (config.init, config.rank_allocation, config.needs_calibration) == ("svd", "uniform", False)
    # A fixed rank has no budget to allocate: uniform ranks, whitened init.
    config = config_of("--inher_r", "16", "--inher_num_heads", "3", "--inher_target_modules", "query", "value")
    assert (config.r, config.num_heads, config.target_modules, config.init, config.rank_allocation) == (
        16, 3, ["query", "value"], "whitened", "uniform")
    assert config_of("--inher_target_modules", r".*\.(query|key)").target_modules == r".*\.(query|key)"
    assert config_of("--inher_target_ratio", "0.4", "--inher_rank_allocation", "energy").rank_allocation == "energy"


def test_resolve_checkpoint(tmp_path):
    from inhernet_hf.checkpoints import CHECKPOINT_STATE_FILE, CheckpointError, resolve_checkpoint

    assert resolve_checkpoint("latest", tmp_path) is None  # nothing yet: a fresh start
    (tmp_path / ".tmp-step_9").mkdir()
    (tmp_path / ".tmp-step_9" / CHECKPOINT_STATE_FILE).write_text('{"completed_steps": 9}')
    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / CHECKPOINT_STATE_FILE).write_text('{"completed_steps": 3}')
    (tmp_path / "step_5").mkdir()  # incomplete (no state file)
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "step_3"
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "step_7"), tmp_path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "step_5"), tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# (e) bad input: a clear error before any training
# ------------------------------------------------------------------------------------------------------------------


def _fail(argv, tmp_path, capsys) -> str:
    """Run the recipe in process; it must exit with an error, having trained and written nothing."""
    recipe = load_recipe()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        recipe.main([*map(str, argv), "--output_dir", str(out)])
    assert info.value.code not in (0, None)
    assert not (out / "all_results.json").exists() and not list(out.glob("step_*"))
    message = info.value.code if isinstance(info.value.code, str) else capsys.readouterr().err
    return message


def _write_tsv(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_unknown_task_lists_the_tasks(tmp_path, capsys):
    message = _fail(["--task_name", "sst3", "--model_name_or_path", minilm_path()], tmp_path, capsys)
    assert "invalid choice: 'sst3'" in message
    assert all(task in message for task in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli"))


@needs_glue
def test_missing_data_file_names_the_path(tmp_path, capsys):
    message = _fail(["--task_name", "qnli", "--data_dir", str(GLUE), "--model_name_or_path", minilm_path()],
                    tmp_path, capsys)
    assert str(GLUE / "QNLI" / "train.tsv") in message and "dev.tsv" not in message.split("missing")[1].split("]")[0]


def test_tsv_with_wrong_columns(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "dev"):  # SST-2 files put where MRPC belongs
        _write_tsv(data / "MRPC" / f"{split}.tsv", ["sentence\tlabel", "a fine film\t1"])
    message = _fail(["--task_name", "mrpc", "--data_dir", str(data), "--model_name_or_path", minilm_path()],
                    tmp_path, capsys)
    assert str(data / "MRPC" / "train.tsv") in message and "#1 String" in message and "missing" in message


def test_headerless_cola_with_wrong_column_count(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "dev"):
        _write_tsv(data / "CoLA" / f"{split}.tsv", ["sentence\tlabel", "The sailors rode the breeze.\t1"])
    message = _fail(["--task_name", "cola", "--data_dir", str(data), "--model_name_or_path", minilm_path()],
                    tmp_path, capsys)
    assert "4 tab-separated columns" in message and str(data / "CoLA" / "train.tsv") in message


def test_unknown_text_label(tmp_path, capsys):
    data = tmp_path / "data"
    _write_tsv(data / "RTE" / "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tentailment",
                                            "1\tC.\tD.\tmaybe"])
    _write_tsv(data / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tnot_entailment"])
    message = _fail(["--task_name", "rte", "--data_dir", str(data), "--model_name_or_path", minilm_path()],
                    tmp_path, capsys)
    assert f"{data / 'RTE' / 'train.tsv'}:3" in message and "'maybe'" in message


@needs_glue
def test_teacher_with_other_num_labels(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    three = tmp_path / "three_label_teacher"
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3).save_pretrained(three)
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--teacher_name_or_path", three], tmp_path, capsys)
    assert "num_labels=3" in message and "2 label(s)" in message


@needs_glue
def test_teacher_with_another_vocabulary(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    other = tmp_path / "other_vocab_teacher"
    AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).save_pretrained(other)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_tokens(["inhernetzzz"])
    tokenizer.save_pretrained(other)
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--teacher_name_or_path", other], tmp_path, capsys)
    assert "has a different vocabulary from the student's tokenizer" in message


def test_non_finite_regression_score_is_refused():
    recipe = load_recipe()
    for value in ("nan", "inf", "x"):
        with pytest.raises(recipe.GlueRecipeError, match=f"f.tsv:2: score '{value}' is not a finite number"):
            recipe._parse_label(recipe.GLUE_TASKS["stsb"], value, "f.tsv:2")


@needs_glue
def test_teacher_that_is_not_fine_tuned(tmp_path, capsys):
    # Default teacher = --model_name_or_path, here the raw pretrained MiniLM: its classifier would be random.
    message = _fail([*SST2, "--model_name_or_path", minilm_path()], tmp_path, capsys)
    assert "not fine-tuned" in message and "classifier" in message and "--kd_alpha 0" in message


@pytest.fixture(scope="module")
def narrow_teacher(tmp_path_factory):
    """A saved SST-2-shaped BERT classifier with MiniLM's vocabulary but hidden size 32 (MiniLM: 384), weights only
    (no tokenizer files): a valid KD teacher of another width."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("glue") / "narrow_teacher"
    vocab = BertConfig.from_pretrained(minilm_path()).vocab_size
    BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, num_labels=2)
                                  ).save_pretrained(path)
    return path


@needs_glue
def test_hkt_with_a_teacher_of_another_width_is_refused(narrow_teacher, tmp_path, capsys):
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--teacher_name_or_path", narrow_teacher,
                     "--student_num_layers", "3", "--distill_method", "hkt"], tmp_path, capsys)
    assert ("the teacher's is 32 and the student's 384. For a teacher of another width use --distill_method "
            "hcd") in message


@needs_glue
def test_hcd_branches_follow_the_optimizers_no_decay_rule(narrow_teacher, tmp_path, monkeypatch):
    """HCD's training-only branches (here mapping to a narrower teacher) join the student's optimizer under
    build_optimizer's rule: --weight_decay on weight matrices, none on biases."""
    recipe = load_recipe()
    prepared = {}

    class Prepared(Exception):
        pass

    def prepare_training(accelerator, model, optimizer, *args):
        prepared.update(model=model, optimizer=optimizer)
        raise Prepared  # what is checked is built; no training

    monkeypatch.setattr(recipe, "prepare_training", prepare_training)
    with pytest.raises(Prepared):
        recipe.main([*SST2, "--model_name_or_path", minilm_path(), "--teacher_name_or_path", str(narrow_teacher),
                     "--student_num_layers", "2", "--distill_method", "hcd", "--weight_decay", "0.01",
                     "--output_dir", str(tmp_path / "out")])
    student = {id(p) for p in prepared["model"].parameters()}
    decay = {id(p): group["weight_decay"] for group in prepared["optimizer"].param_groups for p in group["params"]}
    branches = [p for group in prepared["optimizer"].param_groups for p in group["params"] if id(p) not in student]
    assert student <= set(decay) and {p.ndim for p in branches} == {1, 2}  # biases and weight matrices
    assert all(decay[id(p)] == (0.01 if p.ndim == 2 else 0.0) for p in branches)


@pytest.mark.parametrize("flags, message", [
    (["--no_inher", "--inher_target_ratio", "0.3", "--inher_init", "svd"],
     "this run does not inherit (--no_inher): remove --inher_target_ratio, --inher_init"),
    (["--student_num_layers", "3", "--inher_num_heads", "3"],
     "this run does not inherit (a student run): remove --inher_num_heads"),
    (["--no_inher", "--teacher_name_or_path", "t", "--kd_temperature", "7"],
     "--no_inher trains the teacher without distillation: remove --kd_temperature, --teacher_name_or_path"),
    (["--kd_alpha", "0", "--teacher_name_or_path", "t"],
     "nothing is distilled with --kd_alpha 0 (and no --kd_hidden_weight): remove --teacher_name_or_path"),
    (["--student_num_layers", "3", "--distill_method", "hkt", "--kd_alpha", "0.9"],
     "HKT uses its own --hkt_* weights, not Hinton KD's: remove --kd_alpha"),
    (["--student_num_layers", "3", "--distill_method", "hkt", "--kd_temperature", "3"],
     "HKT uses its own --hkt_* weights, not Hinton KD's: remove --kd_temperature"),
    (["--student_num_layers", "3", "--distill_method", "hcd", "--kd_hidden_weight", "1", "--kd_temperature", "3"],
     "HCD uses its own --hcd_* weights and --kd_temperature (its KL temperature), not Hinton KD's: remove "
     "--kd_hidden_weight."),
    (["--student_num_layers", "3", "--hkt_lambda", "0.5"], "--distill_method kd does not use --hkt_lambda"),
    (["--student_num_layers", "3", "--distill_method", "hkt", "--hcd_k", "2", "--hcd_theta", "0.1"],
     "--distill_method hkt does not use --hcd_k, --hcd_theta (the --hkt_* flags set HKT, the --hcd_* flags HCD)"),
    (["--student_num_layers", "3", "--distill_method", "hcd", "--hkt_lambda", "0.5"],
     "--distill_method hcd does not use --hkt_lambda"),
    (["--student_num_layers", "3", "--distill_method", "hcd", "--hcd_k", "0"],
     "--hcd_k and --hcd_num_stages must be >= 1, got 0, None"),
    (["--student_num_layers", "3", "--distill_method", "hkt", "--hkt_lambda", "-0.5"],
     "--hkt_lambda (a mixing weight) must lie in [0, 1], got -0.5"),
    (["--student_num_layers", "3", "--distill_method", "hcd", "--hcd_theta", "1.5"],
     "--hcd_theta (a cosine margin) in [-1, 1), got 6.0, 1.0, 1.5"),
    (["--task_name", "stsb", "--kd_temperature", "3"],
     "stsb is a regression: its KD term is the MSE to the teacher's outputs, without a temperature"),
    (["--kd_alpha", "0", "--kd_hidden_weight", "1", "--kd_temperature", "3"],
     "--kd_alpha 0 turns the logit term off: remove --kd_temperature"),
    (["--max_train_samples", "-5"], "--max_train_samples must be >= 1, got -5"),
    (["--max_length", "0"], "--max_length must be >= 1, got 0"),
    (["--lr_scheduler_type", "reduce_lr_on_plateau"], "invalid choice: 'reduce_lr_on_plateau'"),
])
def test_flags_that_would_be_unused_or_invalid_are_refused_at_parse_time(flags, message, capsys):
    with pytest.raises(SystemExit):
        load_recipe().parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--output_dir", "o", *flags])
    assert message in capsys.readouterr().err


def test_kd_temperature_is_hcds_kl_temperature():
    """--kd_temperature sets HCD's KL temperature; without it, glue.py and the library's HCD use the same T."""
    import inspect

    from inhernet_hf.distill import HCDLoss, hcd_loss

    def parse(*flags):
        return load_recipe().parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--output_dir", "o",
                                         "--student_num_layers", "3", "--distill_method", "hcd", *flags])

    assert parse("--kd_temperature", "3").kd_temperature == 3.0
    default = parse().kd_temperature
    assert inspect.signature(HCDLoss).parameters["temperature"].default == default
    assert inspect.signature(hcd_loss).parameters["temperature"].default == default


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="needs a tracker that is not installed")
def test_tracking_with_no_installed_tracker_is_an_error(tmp_path):
    """accelerate drops trackers that are not installed with a debug log; the recipes refuse instead of logging
    nothing."""
    from inhernet_hf.training import build_accelerator, TrackingError

    args = load_recipe().parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--output_dir",
                                     str(tmp_path), "--with_tracking", "--report_to", "wandb"])
    with pytest.raises(TrackingError, match="--with_tracking --report_to wandb: none of these trackers is installed"):
        build_accelerator(args)


@needs_glue
def test_bad_inheritance_and_resume_options(tmp_path, capsys):
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--inher_init", "bogus"], tmp_path, capsys)
    assert "argument --inher_init: invalid choice: 'bogus' (choose from 'svd', 'svd_lowrank', 'whitened'" in message
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--inher_num_heads", "0"], tmp_path, capsys)
    assert "bad inheritance options" in message and "num_heads=0 must be an int >= 1" in message
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--inher_r", "8", "--inher_target_ratio", "0.5"],
                    tmp_path, capsys)
    assert "only one of --inher_r and --inher_target_ratio" in message
    message = _fail([*SST2, "--model_name_or_path", minilm_path(), "--no_inher",
                     "--resume_from_checkpoint", tmp_path / "nope"], tmp_path, capsys)
    assert "no such folder" in message


@needs_glue
def test_hidden_state_distillation_options(teacher, tmp_path, capsys):
    message = _fail([*SST2, "--model_name_or_path", teacher, "--kd_hidden_weight", "-1"], tmp_path, capsys)
    assert "--kd_hidden_weight must be >= 0, got -1.0" in message
    message = _fail([*SST2, "--model_name_or_path", teacher, "--no_inher", "--kd_hidden_weight", "1"], tmp_path,
                    capsys)
    assert "--no_inher trains the teacher without distillation: remove --kd_hidden_weight" in message
    # A 3-layer student of the 6-layer teacher cannot be matched layer by layer: refused before training.
    message = _fail([*SST2, "--model_name_or_path", teacher, "--student_num_layers", "3", "--kd_hidden_weight", "1"],
                    tmp_path, capsys)
    assert "(layers, hidden size) = (6, 384); it has (3, 384)" in message

    # Accepted: 2 steps on the hidden-state term alone (no logit KD) train and change the loss against plain CE.
    recipe = load_recipe()
    losses = {}
    for weight in ("0", "1"):
        out = tmp_path / f"hidden_{weight}"
        r = recipe.main([*SST2, "--model_name_or_path", str(teacher), "--inher_target_ratio", "0.5", "--kd_alpha", "0",
                         "--kd_hidden_weight", weight, "--max_train_steps", "2", "--per_device_train_batch_size", "8",
                         "--max_eval_samples", "16", "--output_dir", str(out)])
        assert r["inherited"] and r["kd"] == (weight == "1") and math.isfinite(r["train_loss"])
        losses[weight] = r["train_loss"]
    assert losses["1"] > losses["0"]  # the same two batches: CE + a positive term
