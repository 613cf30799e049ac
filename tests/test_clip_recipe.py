"""recipes/clip.py and its loss: the contrastive losses equal transformers' own CLIP / SigLIP losses (and the
hand-computed value with repeated captions), retrieval recalls on hand-made embeddings, and the recipe end to end
on real images (Fashion-MNIST captioned from its class names): a CLIP and a SigLIP trained from scratch, a CLIP
inherited with KD that reloads as an inherited model and scores what the recipe reported, resume is exact."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from inhernet_hf.distill import ContrastiveLoss, contrastive_loss
from inhernet_hf.model import InherModel
from recipes import load_recipe, results
from reference import safetensors_equal

FMNIST = Path(os.environ.get("INHERNET_IDX_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"Fashion-MNIST idx files not found under {FMNIST} "
                                         f"(apt-get install dataset-fashion-mnist)")
recipe = load_recipe("clip")
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SIGLIP = json.dumps({"text_config": TOWER, "vision_config": {"patch_size": 7, **TOWER}})
CLIP = json.dumps({"text_config": TOWER, "vision_config": {"patch_size": 7, **TOWER}, "projection_dim": 16})
DATA = ["--idx_dir", str(FMNIST), "--max_train_samples", "256", "--max_eval_samples", "120",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "50", "--learning_rate", "2e-3",
        "--num_train_epochs", "1"]


def test_contrastive_loss_equals_transformers_clip_and_siglip_losses():
    """With distinct captions, contrastive_loss of the logits is the loss CLIPModel / SiglipModel return."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = {**TOWER, "image_size": 14, "patch_size": 7, "num_channels": 1}
    ids, pixels = torch.randint(4, 50, (5, 6)), torch.randn(5, 1, 14, 14)
    ids[:, -1] = 3  # CLIP pools at the eos token
    for model, sigmoid in ((CLIPModel(CLIPConfig(text_config={**TOWER, "vocab_size": 50, "eos_token_id": 3},
                                                 vision_config=vision)), False),
                           (SiglipModel(SiglipConfig(text_config={**TOWER, "vocab_size": 50},
                                                     vision_config=vision)), True)):
        with torch.no_grad():
            out = model.eval()(input_ids=ids, pixel_values=pixels, return_loss=True)
        assert torch.allclose(contrastive_loss(out.logits_per_image, torch.arange(5), sigmoid), out.loss, atol=1e-5)


def test_repeated_captions_are_positives():
    """Images 0 and 1 share a caption: each of them targets texts 0 and 1 with 1/2, and so does each of those texts."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 2.0]])
    ids = torch.tensor([7, 7, 9])
    log_p_i2t, log_p_t2i = F.log_softmax(logits, -1), F.log_softmax(logits.t(), -1)
    i2t = -(0.5 * (log_p_i2t[0, 0] + log_p_i2t[0, 1]) + 0.5 * (log_p_i2t[1, 0] + log_p_i2t[1, 1]) + log_p_i2t[2, 2]) / 3
    t2i = -(0.5 * (log_p_t2i[0, 0] + log_p_t2i[0, 1]) + 0.5 * (log_p_t2i[1, 0] + log_p_t2i[1, 1]) + log_p_t2i[2, 2]) / 3
    assert torch.allclose(contrastive_loss(logits, ids), (i2t + t2i) / 2)
    sigmoid = -(F.logsigmoid(torch.tensor([2.0, 1.0, -0.0, 0.0, 1.0, -3.0, -1.0, -0.0, 2.0]))).sum() / 3
    assert torch.allclose(contrastive_loss(logits, ids, sigmoid=True), sigmoid)


def test_kd_term_is_zero_against_itself_and_needs_a_teacher():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config={**TOWER, "vocab_size": 50, "eos_token_id": 3},
                                 vision_config={**TOWER, "image_size": 14, "patch_size": 7, "num_channels": 1}))
    batch = {"input_ids": torch.tensor([[1, 5, 3], [1, 6, 3]]), "pixel_values": torch.randn(2, 1, 14, 14),
             "labels": torch.tensor([0, 1])}
    loss, logs = ContrastiveLoss(model, alpha=0.5, temperature=2.0)(model, batch)
    assert logs["kd_loss"].abs() < 1e-6 and torch.allclose(loss, 0.5 * logs["task_loss"])
    with pytest.raises(ValueError, match="alpha=0.5 distils from a teacher, but none was given"):
        ContrastiveLoss(None, alpha=0.5)


def test_retrieval_recalls_hand_made():
    # 4 images, captions [a, a, b, c]; the distinct-caption gallery holds text embeddings 0 (a), 2 (b), 3 (c)
    eye = torch.eye(3)
    texts = torch.stack([eye[0], eye[0], eye[1], eye[2]])
    images = F.normalize(torch.tensor([[1.0, 0.2, 0.0],    # -> a (right)
                                       [0.1, 1.0, 0.5],    # -> b, then c, then a (wrong at 1, right at 3)
                                       [0.0, 1.0, 0.0],    # -> b (right)
                                       [0.0, 0.3, 1.0]]), dim=-1)  # -> c (right)
    ids = torch.tensor([5, 5, 8, 9])
    metrics = recipe.retrieval_recalls(images, texts, ids, ks=(1, 3))
    assert metrics["i2t_R@1"] == 0.75 and metrics["i2t_R@3"] == 1.0
    # text queries: a's nearest image is 0 (an a: hit); b's is image 2 (hit); c's is image 3 (hit)
    assert metrics["t2i_R@1"] == 1.0 and metrics["t2i_R@3"] == 1.0
    wrong = recipe.retrieval_recalls(images, texts, torch.tensor([5, 8, 5, 9]), ks=(1,))
    # captions now [a, b, a, c]: image 1 (b) -> b right, image 2 (a) -> b wrong; query b's nearest image is 2 (an a)
    assert wrong["i2t_R@1"] == 0.75 and wrong["t2i_R@1"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "teacher"
    recipe.main([*DATA, "--model_type", "clip", "--config_overrides", CLIP, "--no_inher", "--output_dir", str(out)])
    return out


def recomputed_metrics(model_dir: Path) -> dict:
    """The eval metrics recomputed from the saved folder with plain transformers loading (after the import)."""
    args = recipe.parse_args([*DATA, "--model_name_or_path", str(model_dir), "--no_inher", "--output_dir", "unused"])
    data = recipe.load_pairs(args)["validation"].select(range(120))
    model, tokenizer = AutoModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    captions = sorted(set(data["caption"]))
    collate = recipe.make_collate(args, tokenizer, None, 1, {c: i for i, c in enumerate(captions)}, 16, False)
    batch = collate(list(data))
    with torch.no_grad():
        image = F.normalize(recipe.features(model.get_image_features(pixel_values=batch["pixel_values"])), dim=-1)
        text = F.normalize(recipe.features(model.get_text_features(input_ids=batch["input_ids"],
                                                                   attention_mask=batch["attention_mask"])), dim=-1)
        prompts = tokenizer([f"a photo of a {n}" for n in recipe.FASHION_MNIST_LABELS], padding=True,
                            return_tensors="pt")
        classes = F.normalize(recipe.features(model.get_text_features(**prompts)), dim=-1)
    metrics = recipe.retrieval_recalls(image, text, batch["labels"])
    metrics["zero_shot_accuracy"] = float(((image @ classes.T).argmax(-1) == batch["class_labels"]).float().mean())
    return metrics, model


@needs_fmnist
def test_teacher_then_inherited_clip_with_kd_reload_and_score_what_they_reported(teacher, tmp_path):
    t = results(teacher)
    assert not t["inherited"] and t["model_type"] == "clip" and t["eval_samples"] == 120
    out = tmp_path / "inher"
    r = recipe.main([*DATA, "--model_name_or_path", str(teacher), "--inher_target_ratio", "0.5", "--kd_alpha", "0.5",
                     "--kd_temperature", "2", "--output_dir", str(out)])
    assert r["inherited"] and r["kd"] and r["params_ratio"] < 0.8  # embeddings and projections stay dense
    for folder, reported in ((teacher, t), (out, r)):
        metrics, model = recomputed_metrics(folder)
        assert isinstance(model, InherModel) == (folder == out)
        for name, value in metrics.items():
            assert value == pytest.approx(reported[f"eval_{name}"], abs=1e-6), name


@needs_fmnist
def test_resumed_run_equals_the_uninterrupted_one(teacher, tmp_path):
    args = [*DATA, "--model_name_or_path", str(teacher), "--inher_target_ratio", "0.5", "--kd_alpha", "0.5",
            "--checkpointing_steps", "4", "--seed", "3"]
    full = recipe.main([*args, "--output_dir", str(tmp_path / "full")])
    resumed = recipe.main([*args, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                           str(tmp_path / "full" / "step_4")])
    assert resumed["resumed_from"].endswith("step_4") and resumed["eval_i2t_R@5"] == full["eval_i2t_R@5"]
    assert safetensors_equal(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")


@needs_fmnist
def test_siglip_from_scratch_trains_with_the_sigmoid_loss(tmp_path):
    r = recipe.main([*DATA, "--model_type", "siglip", "--config_overrides", SIGLIP, "--no_inher",
                     "--output_dir", str(tmp_path)])
    assert r["model_type"] == "siglip" and math.isfinite(r["train_loss"]) and 0 <= r["eval_i2t_R@1"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--model_type", "clip"], "--model_type trains a teacher from scratch: add --no_inher"),
    (["--model_type", "clip", "--no_inher", "--kd_hidden_weight", "1"], "--kd_hidden_weight is not supported here"),
    (["--model_type", "clip", "--no_inher", "--zero_shot_template", "a photo"],
     "--zero_shot_template needs a '{}' where the class name goes"),
    (["--model_name_or_path", "m", "--model_type", "clip"], "Give exactly one of --model_name_or_path and --model_type"),
])
def test_bad_arguments_fail_before_training(flags, message, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--idx_dir", str(FMNIST), *flags, "--output_dir", "o"])
    assert message in capsys.readouterr().err


@needs_fmnist
def test_a_patch_size_that_does_not_divide_the_images_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="image_size 28 must be a multiple of patch_size 32"):
        recipe.main([*DATA, "--model_type", "clip", "--no_inher", "--output_dir", str(tmp_path)])


@needs_fmnist
def test_local_imagefolder_with_captions(tmp_path):
    """--train_dir / --validation_dir: imagefolders whose metadata.jsonl holds the captions (no class labels, so no
    zero-shot metric)."""
    from PIL import Image

    data = recipe.load_idx(str(FMNIST), recipe.FASHION_MNIST_LABELS)["validation"].select(range(40))
    for split, rows in (("train", range(0, 30)), ("validation", range(30, 40))):
        folder = tmp_path / split
        folder.mkdir()
        with open(folder / "metadata.jsonl", "w") as f:
            for i in rows:
                Image.fromarray(np.asarray(data[i]["image"], dtype=np.uint8)).save(folder / f"{i}.png")
                caption = f"a {recipe.FASHION_MNIST_LABELS[data[i]['label']]} seen from the front"
                f.write(json.dumps({"file_name": f"{i}.png", "caption": caption}) + "\n")
    r = recipe.main(["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "validation"),
                     "--model_type", "clip", "--config_overrides", CLIP, "--no_inher", "--num_train_epochs", "1",
                     "--per_device_train_batch_size", "10", "--output_dir", str(tmp_path / "out")])
    assert r["eval_samples"] == 10 and r["train_samples"] == 30 and "eval_zero_shot_accuracy" not in r
    assert 0 <= r["eval_t2i_R@1"] <= 1
