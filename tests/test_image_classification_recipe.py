"""recipes/image_classification.py on real images (Fashion-MNIST's idx files from Debian's dataset-fashion-mnist):
a ResNet teacher trained from scratch, then inherited (InherConv2d) and distilled; the saved model reloads with
plain transformers and scores what the recipe reported; resume is exact; bad input fails before training."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from inhernet_hf.conv import InherConv2d
from recipes import load_recipe, results
from reference import safetensors_equal

FMNIST = Path(os.environ.get("INHERNET_IDX_DIR", "/usr/share/datasets/fashion-mnist"))
pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST idx files not found under {FMNIST} "
                                       f"(apt-get install dataset-fashion-mnist)")
recipe = load_recipe("image_classification")
DATA = ["--idx_dir", str(FMNIST), "--max_train_samples", "512", "--max_eval_samples", "200",
        "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "100", "--learning_rate", "3e-3"]
RESNET = '{"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [2, 1], "layer_type": "basic"}'


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fmnist") / "teacher"
    recipe.main([*DATA, "--model_type", "resnet", "--config_overrides", RESNET, "--no_inher", "--num_train_epochs", "1",
                 "--max_train_samples", "2000", "--output_dir", str(out)])  # the later --max_train_samples wins
    return out


def test_read_idx_gives_the_fashion_mnist_arrays():
    images = recipe.read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = recipe.read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and labels.shape == (10000,)
    assert sorted(np.unique(labels)) == list(range(10))


def test_teacher_then_inherited_student_reloads_and_scores_what_it_reported(teacher, tmp_path):
    t = results(teacher)
    assert not t["inherited"] and t["eval_samples"] == 200 and t["eval_accuracy"] > 0.5  # 10 classes: chance 0.1
    out = tmp_path / "inher"
    r = recipe.main([*DATA, "--model_name_or_path", str(teacher), "--inher_target_ratio", "0.5", "--kd_alpha", "0.5",
                     "--kd_temperature", "4", "--num_train_epochs", "1", "--output_dir", str(out)])
    assert r["inherited"] and r["kd"] and r["params_ratio"] < 0.55
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(model.resnet.encoder.stages[0].layers[0].layer[0].convolution, InherConv2d)
    data = recipe.load_idx(str(FMNIST), recipe.FASHION_MNIST_LABELS)["validation"].select(range(200))
    pixels = torch.tensor(np.stack(data["image"]), dtype=torch.float32)[:, None] / 127.5 - 1.0
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(-1)
    assert (predictions == torch.tensor(data["label"])).float().mean().item() == pytest.approx(r["eval_accuracy"])


def test_resumed_run_equals_the_uninterrupted_one(teacher, tmp_path):
    args = [*DATA, "--model_name_or_path", str(teacher), "--inher_target_ratio", "0.5", "--kd_alpha", "0.5",
            "--max_train_steps", "6", "--checkpointing_steps", "3", "--seed", "1"]
    recipe.main([*args, "--output_dir", str(tmp_path / "full")])
    recipe.main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                 str(tmp_path / "full" / "step_3")])
    assert results(tmp_path / "resumed")["resumed_from"].endswith("step_3")
    assert safetensors_equal(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


@pytest.mark.parametrize("flags, message", [
    (["--dataset_name", "x", "--model_type", "resnet", "--no_inher"], "exactly one of --dataset_name, --train_dir"),
    (["--model_type", "resnet"], "--model_type trains a teacher from scratch: add --no_inher"),
    (["--model_type", "resnet", "--model_name_or_path", "m", "--no_inher"], "exactly one of --model_name_or_path"),
    (["--model_name_or_path", "m", "--student_depths", "1", "1", "--inher_target_ratio", "0.5"],
     "this run does not inherit (a student run): remove --inher_target_ratio"),
    (["--model_name_or_path", "m", "--student_depths", "1", "1", "--distill_method", "hkt", "--kd_alpha", "0.3"],
     "HKT uses its own --hkt_* weights, not Hinton KD's: remove --kd_alpha"),
    (["--model_name_or_path", "m", "--no_inher", "--distill_method", "hcd"],
     "--distill_method hcd needs a student or an inherited model"),
    (["--model_name_or_path", "m", "--config_overrides", "{}", "--inher_init", "whitened", "--inher_num_heads", "0"],
     None),
])
def test_bad_arguments_fail_before_training(flags, message, capsys, tmp_path):
    argv = ["--idx_dir", str(FMNIST), *flags, "--output_dir", str(tmp_path / "o")]
    if message is None:  # parses, then InherConfig refuses num_heads=0 before any data or model is read
        with pytest.raises(SystemExit, match="bad inheritance options: InherConfig.num_heads=0"):
            recipe.main(argv)
    else:
        with pytest.raises(SystemExit):
            recipe.parse_args(argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["kd", "hkt", "hcd"])
def test_stage_students_train_with_each_distillation_method(teacher, tmp_path, method):
    """A student keeping one block per stage, trained with Hinton KD, HKT or HCD; saved without HCD's branches,
    it reloads as a plain ResNet with depths [1, 1] and scores what the recipe reported."""
    flags = {"kd": ["--kd_alpha", "0.5"], "hkt": ["--distill_method", "hkt"], "hcd": ["--distill_method", "hcd"]}
    r = recipe.main([*DATA, "--model_name_or_path", str(teacher), "--student_depths", "1", "1", *flags[method],
                     "--num_train_epochs", "1", "--output_dir", str(tmp_path)])
    assert r["kd"] and r["distill_method"] == method and r["student_depths"] == [1, 1] and not r["inherited"]
    model = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert model.config.depths == [1, 1] and model.num_parameters() == r["total_params"] < r["dense_params"]
    data = recipe.load_idx(str(FMNIST), recipe.FASHION_MNIST_LABELS)["validation"].select(range(200))
    pixels = torch.tensor(np.stack(data["image"]), dtype=torch.float32)[:, None] / 127.5 - 1.0
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(-1)
    assert (predictions == torch.tensor(data["label"])).float().mean().item() == pytest.approx(r["eval_accuracy"])


def test_compare_on_images_matches_inhernet_to_the_stage_student(teacher, tmp_path):
    """compare.py --recipe image_classification end to end (CI-sized): the teacher row, a [1, 1] student with HKT
    and InherNet matched to its size, one seed."""
    import json
    import subprocess
    import sys

    from recipes import REPO

    command = [sys.executable, str(REPO / "recipes" / "compare.py"), "--recipe", "image_classification",
               "--teacher_name_or_path", str(teacher), "--idx_dir", str(FMNIST), "--methods", "teacher",
               "student_hkt", "inher", "--seeds", "1", "--max_train_samples", "256", "--max_eval_samples", "200",
               "--num_train_epochs", "1", "--per_device_train_batch_size", "64", "--learning_rate", "3e-3",
               "--launcher", f"{sys.executable} -m accelerate.commands.launch --cpu --num_processes 1 "
               "--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process 1",
               "--output_dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["student_depths"] == [1, 1] and summary["total_steps"] == 4
    student, inher = results(tmp_path / "student_hkt" / "seed_1"), results(tmp_path / "inher" / "seed_1")
    assert student["distill_method"] == "hkt" and inher["inherited"] and not inher["kd"]
    assert 0.99 <= inher["total_params"] / student["total_params"] <= 1.0  # never larger, within 1%
    assert [r["method"] for r in summary["rows"]] == ["teacher", "student_hkt", "inher"]


def test_truncated_idx_file_is_named(tmp_path):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        data = (FMNIST / name).read_bytes()
        (tmp_path / name).write_bytes(data)
    whole = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(whole[:-100]))
    with pytest.raises(recipe.ImageRecipeError, match=r"t10k-images-idx3-ubyte.gz: header says \(10000, 28, 28\) but holds 7839900 bytes"):
        recipe.load_idx(str(tmp_path), recipe.FASHION_MNIST_LABELS)
