"""The student baselines: HKT and HCD losses against hand-computed values, gradients reaching exactly the trained
parameters, layer students (real MiniLM-L6, tiny Llama) and the parameter-matched InherNet ratio."""

import math

import pytest
import torch
from torch import nn

from inhernet_hf import InherConfig, get_inher_model
from inhernet_hf.distill import (HCDBranches, HCDLoss, HKTLoss, genetic_mixture, hcd_loss, hkt_loss,
                                 orthogonality_loss, stage_ends)
from inhernet_hf.students import (evenly_spaced_layers, layer_student, layer_student_param_count,
                                  matched_target_ratio)
from reference import minilm_path, tiny_llama


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------------------------
# HKT
# ------------------------------------------------------------------------------------------------------------------


def test_genetic_mixture_and_hkt_loss_hand_computed():
    q, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # <q, p> = 0 -> a = 1/2, GA = (p + q)/2 = [.5, .5], mix = q + 0.6 (p - GA) = [0.7, 0.3]
    assert torch.allclose(genetic_mixture(q, p, 0.6), torch.tensor([[0.7, 0.3]]))
    same = torch.tensor([[1.0, 1.0]])  # p = q: GA = p whatever a is, so mix = q
    assert torch.allclose(genetic_mixture(same, same, 0.6), same)
    a = 1 / (1 + math.exp(-3 / math.sqrt(2)))  # q = [1, 2], p = [1, 1]: <q, p> = 3
    expected = torch.tensor([1.0, 2.0]) + 0.6 * (1 - a) * (torch.tensor([1.0, 1.0]) - torch.tensor([1.0, 2.0]))
    assert torch.allclose(genetic_mixture(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]), 0.6), expected)

    child_head = nn.Identity()                 # logits = feature
    parent_head = lambda x: x.flip(-1)         # noqa: E731  logits = swapped feature
    loss, logs = hkt_loss(q, p, child_head, parent_head, torch.tensor([0]), lam=0.6)
    # CE([1, 0], 0) = softplus(-1); CE([.7, .3], 0) = softplus(-.4); CE([.3, .7], 0) = softplus(.4)
    assert logs["task_loss"].item() == pytest.approx(softplus(-1.0), rel=1e-6)
    assert logs["mix_child_ce"].item() == pytest.approx(softplus(-0.4), rel=1e-6)
    assert logs["mix_parent_ce"].item() == pytest.approx(softplus(0.4), rel=1e-6)
    assert loss.item() == pytest.approx(softplus(-1.0) + softplus(-0.4) + softplus(0.4), rel=1e-6)
    with pytest.raises(ValueError, match="need one width: got 2 and 3. For a teacher of another width use HCD"):
        hkt_loss(q, torch.ones(1, 3), child_head, parent_head, torch.tensor([0]))


# ------------------------------------------------------------------------------------------------------------------
# HCD
# ------------------------------------------------------------------------------------------------------------------


def test_orthogonality_loss_hand_computed():
    sub = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # (B=1, k=2, K=3), identical vectors
    assert orthogonality_loss(sub, torch.tensor([2]), 0.5).item() == pytest.approx(0.25)  # cos 1: (1 - .5)^2
    assert orthogonality_loss(sub, torch.tensor([0]), 0.5).item() == 0.0  # true class masked: zero vectors
    sub = torch.tensor([[[1.0, 1.0, 0.0], [1.0, -1.0, 5.0]]])
    assert orthogonality_loss(sub, torch.tensor([2]), 0.5).item() == 0.0  # masked: cos 0
    sub = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])  # cos 45 deg = 0.7071
    assert orthogonality_loss(sub, torch.tensor([2]), 0.5).item() == pytest.approx((math.sqrt(0.5) - 0.5) ** 2)
    assert orthogonality_loss(sub[:, :1], torch.tensor([2])).item() == 0.0  # k = 1: no pairs


def test_hcd_loss_hand_computed():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    sub = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])  # (S=1, B=1, k=2, K=2) -> fused [1, 1] and [2, 0]
    labels = torch.tensor([0])
    loss, logs = hcd_loss(student, teacher, sub, labels, lam=6.0, beta=1.0, theta=0.5, temperature=1.0)
    p = 1 / (1 + math.exp(-2.0))  # softmax([2, 0])[0]
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)  # KL(fused_2 || student); fused_1 gives 0
    assert logs["task_loss"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert logs["fused_ce"].item() == pytest.approx((math.log(2) + softplus(-2.0)) / 2, rel=1e-6)
    assert logs["kd_loss"].item() == pytest.approx(kl / 2, rel=1e-6)
    assert logs["orth_loss"].item() == 0.0  # masked sub-logits [0, 1] and [0, 0]
    assert loss.item() == pytest.approx(math.log(2) + (math.log(2) + softplus(-2.0)) / 2 + 6 * kl / 2, rel=1e-6)
    # temperature T scales the KL term by T^2 on softened distributions
    _, logs4 = hcd_loss(student, teacher, sub, labels, temperature=4.0)
    p4 = 1 / (1 + math.exp(-0.5))
    kl4 = p4 * math.log(p4 / 0.5) + (1 - p4) * math.log((1 - p4) / 0.5)
    assert logs4["kd_loss"].item() == pytest.approx(16 * kl4 / 2, rel=1e-6)


def test_hcd_loss_batched_equals_per_sample_sums():
    """S=2 stages, B=3 samples, k=3, K=4: every term equals the plain loop over (stage, sample, sub-logit)."""
    torch.manual_seed(0)
    student, teacher, sub = torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 3, 4)
    labels = torch.tensor([0, 3, 1])
    loss, logs = hcd_loss(student, teacher, sub, labels, lam=6.0, beta=1.0, theta=0.2, temperature=2.0)
    ce = fused_ce = kl = 0.0
    for b in range(3):
        ce += -torch.log_softmax(student[b], -1)[labels[b]].item() / 3
        for s_ in range(2):
            for j in range(3):
                fused = sub[s_, b, j] + teacher[b]
                fused_ce += -torch.log_softmax(fused, -1)[labels[b]].item() / 18
                p_f, p_s = torch.softmax(fused / 2, -1), torch.softmax(student[b] / 2, -1)
                kl += 4 * (p_f * (p_f.log() - p_s.log())).sum().item() / 18
    orth = orthogonality_loss(sub, labels, 0.2).item()
    assert logs["task_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert logs["fused_ce"].item() == pytest.approx(fused_ce, rel=1e-5)
    assert logs["kd_loss"].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(ce + fused_ce + 6 * kl + orth, rel=1e-5)

def test_stage_ends():
    assert stage_ends(3, 3) == [1, 2, 3] and stage_ends(6, 2) == [3, 6] and stage_ends(4, 1) == [4]
    with pytest.raises(ValueError, match=r"num_stages must lie in \[1, 3\]"):
        stage_ends(3, 4)


# ------------------------------------------------------------------------------------------------------------------
# Gradients reach exactly the trained parameters
# ------------------------------------------------------------------------------------------------------------------


def tiny_bert(layers: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def batch():
    torch.manual_seed(1)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, 64, (4, 10)), "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}


def assert_gradients_exactly_on(trained: list[nn.Module], frozen: nn.Module):
    for module in trained:
        for name, param in module.named_parameters():
            assert param.requires_grad and param.grad is not None, name
    for name, param in frozen.named_parameters():
        assert not param.requires_grad and param.grad is None, name


def test_hkt_trains_only_the_child():
    teacher, student = tiny_bert(4, 0), layer_student(tiny_bert(4, 0), 2)
    loss, _ = HKTLoss(teacher, lam=0.6)(student, batch())
    loss.backward()
    assert_gradients_exactly_on([student], teacher)
    assert student.classifier.weight.grad.abs().sum() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_hkt_refuses_a_head_applied_to_the_sequence():
    """A decoder classifier's `score` runs on every position and is pooled after: no input of it is the feature its
    logits come from, so HKT/HCD refuse it instead of distilling the first token's state."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"pooled \(batch, hidden\) feature.*Linear is applied to the \(4, 10, 32\) "
                                         r"sequence\. Use Hinton KD for this model"):
        HKTLoss(model)(model, batch())


def test_hcd_trains_the_student_and_its_branches_only():
    teacher, student = tiny_bert(4, 0), layer_student(tiny_bert(4, 0), 2)
    branches = HCDBranches([32, 32], 32, num_labels=3, k=4)
    loss_fn = HCDLoss(teacher, branches, stage_ends(2, 2), lam=6.0, beta=1.0, theta=0.5, temperature=4.0)
    loss, logs = loss_fn(student, batch())
    assert set(logs) == {"task_loss", "fused_ce", "kd_loss", "orth_loss"}
    loss.backward()
    assert_gradients_exactly_on([student, branches], teacher)
    assert all(p.grad.abs().sum() > 0 for p in branches.parameters())


def test_hcd_branch_terms_reach_the_layers_up_to_their_stage():
    """Only the terms through the branches backpropagated (the student's logits detached, so its CE and KL send
    nothing): with one stage after layer 2 of 4, the gradient reaches layers 1-2 through the stage feature, and
    not layers 3-4."""
    teacher, student = tiny_bert(4, 0), tiny_bert(4, 1)
    student.classifier.register_forward_hook(lambda module, args, output: output.detach())
    branches = HCDBranches([32], 32, num_labels=3)
    loss, _ = HCDLoss(teacher, branches, stage_indices=[2])(student, batch())
    loss.backward()
    grads = [sum(p.grad.abs().sum() for p in layer.parameters() if p.grad is not None)
             for layer in student.bert.encoder.layer]
    assert grads[0] > 0 and grads[1] > 0 and grads[2] == 0 and grads[3] == 0


def accelerate_bf16_forward(model: nn.Module) -> nn.Module:
    """`model` with its forward as Accelerate's bf16 mixed precision prepares it: run under autocast, outputs cast
    back to float32 (features captured inside, such as the classifier's input, stay bfloat16)."""
    from accelerate.utils import convert_outputs_to_fp32

    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    return model


@pytest.mark.parametrize("method", ["hkt", "hcd"])
def test_losses_under_mixed_precision(method):
    """With the student's forward under bf16 autocast, as Accelerate runs it, the loss runs the teacher and its own
    head or branch calls under the autocast it is given: a finite loss near the float32 one, gradients on the
    student, a teacher that computes in bfloat16."""
    teacher, student = tiny_bert(4, 0), layer_student(tiny_bert(4, 0), 2)
    branches = HCDBranches([32, 32], 32, num_labels=3)

    def loss_fn(autocast=None):
        if method == "hkt":
            return HKTLoss(teacher, autocast=autocast)
        return HCDLoss(teacher, branches, stage_ends(2, 2), autocast=autocast)

    reference, _ = loss_fn()(student, batch())
    teacher_dtypes = []  # of the teacher's head outputs: its forward (and, for HKT, the parent head on the mixture)
    teacher.classifier.register_forward_hook(lambda module, args, output: teacher_dtypes.append(output.dtype))
    loss, _ = loss_fn(lambda: torch.autocast("cpu", dtype=torch.bfloat16))(accelerate_bf16_forward(student), batch())
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(reference.item(), rel=0.05)
    assert student.classifier.weight.grad.abs().sum() > 0
    assert teacher_dtypes and set(teacher_dtypes) == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------------
# Students and the parameter-matched InherNet
# ------------------------------------------------------------------------------------------------------------------


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(6, 3) == [0, 2, 4] and evenly_spaced_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert evenly_spaced_layers(6, 6) == list(range(6)) and evenly_spaced_layers(5, 2) == [0, 2]
    with pytest.raises(ValueError, match="between 1 and 6"):
        evenly_spaced_layers(6, 0)


@pytest.fixture(scope="module")
def minilm_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()


def test_layer_student_of_real_minilm(minilm_classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification

    teacher = minilm_classifier
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = layer_student(teacher, 3).eval()
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert teacher.config.num_hidden_layers == 6 and all(torch.equal(v, teacher.state_dict()[k])
                                                         for k, v in before.items())
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        prefix_s, prefix_t = f"bert.encoder.layer.{new}.", f"bert.encoder.layer.{old}."
        keys = [k for k in s if k.startswith(prefix_s)]
        assert keys and all(torch.equal(s[k], t[prefix_t + k[len(prefix_s):]]) for k in keys)
    assert all(torch.equal(s[k], t[k]) for k in s if not k.startswith("bert.encoder.layer."))
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
    with pytest.raises(ValueError, match="distinct increasing"):
        layer_student(teacher, layers=[2, 1])


def test_layer_student_of_a_decoder_keeps_the_kv_cache_consistent():
    teacher = tiny_llama(num_hidden_layers=4).eval()
    student = layer_student(teacher, layers=[1, 3]).eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        cached = student.generate(ids, max_new_tokens=5, do_sample=False)
        uncached = student.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_matched_target_ratio_gives_the_students_size(minilm_classifier):
    import copy

    student_params = sum(p.numel() for p in layer_student(minilm_classifier, 3).parameters())
    assert layer_student_param_count(minilm_classifier, 3) == student_params
    assert layer_student_param_count(minilm_classifier, 6) == sum(p.numel() for p in minilm_classifier.parameters())
    config = InherConfig(target_ratio=0.5, num_heads=2, task_type="SEQ_CLS")
    ratio = matched_target_ratio(minilm_classifier, student_params, config)
    inherited = get_inher_model(copy.deepcopy(minilm_classifier),
                                InherConfig(target_ratio=ratio, num_heads=2, task_type="SEQ_CLS"), progressbar=False)
    total = sum(p.numel() for p in inherited.parameters())
    assert 0.995 < total / student_params <= 1, (total, student_params, ratio)  # never larger than the student
    with pytest.raises(ValueError, match="cannot be reached by inheritance"):
        matched_target_ratio(minilm_classifier, 1_000_000, config)  # fewer than the embeddings alone


# ------------------------------------------------------------------------------------------------------------------
# CNN students (HF ResNet): fewer blocks per stage; HKT and HCD on pooled maps and per-stage widths
# ------------------------------------------------------------------------------------------------------------------


def tiny_resnet(seed: int = 0, depths=(2, 3)):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=list(depths),
                          layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def images(n: int = 4) -> dict:
    torch.manual_seed(1)
    return {"pixel_values": torch.randn(n, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 1][:n])}


def test_stage_student_keeps_evenly_spaced_blocks_of_each_stage(tmp_path):
    from transformers import AutoModelForImageClassification

    from inhernet_hf.students import stage_student, stage_student_param_count

    teacher = tiny_resnet()
    student = stage_student(teacher, [1, 2]).eval()
    assert student.config.depths == [1, 2] and teacher.config.depths == [2, 3]  # the teacher is untouched
    assert sum(p.numel() for p in student.parameters()) == stage_student_param_count(teacher, [1, 2])
    kept = {0: [0], 1: [0, 1]}  # evenly_spaced_layers(2, 1), evenly_spaced_layers(3, 2)
    for s, blocks in kept.items():
        for new, old in enumerate(blocks):
            for a, b in zip(student.resnet.encoder.stages[s].layers[new].parameters(),
                            teacher.resnet.encoder.stages[s].layers[old].parameters()):
                assert torch.equal(a, b)
    # the same computation as the teacher with the dropped blocks removed by hand
    reference = tiny_resnet()
    del reference.resnet.encoder.stages[0].layers[1]
    del reference.resnet.encoder.stages[1].layers[2]
    x = images()["pixel_values"]
    with torch.no_grad():
        assert torch.equal(student(pixel_values=x).logits, reference(pixel_values=x).logits)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, student(pixel_values=x).logits)
    assert stage_student_param_count(teacher, [2, 3]) == sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match=r"between 1 and the teacher's blocks in each of its 2 stages \(teacher "
                                         r"depths \[2, 3\]\), got depths \[1, 4\]"):
        stage_student(teacher, [1, 4])


def test_hkt_on_a_cnn_mixes_the_pooled_features():
    """The classifier's input is the pooled (B, C, 1, 1) map: HKT takes it flattened, and its loss equals hkt_loss
    on the features computed by hand."""
    from inhernet_hf.students import stage_student

    teacher = tiny_resnet()
    student = stage_student(teacher, [1, 1])
    batch = images()
    loss, _ = HKTLoss(teacher)(student, batch)
    with torch.no_grad():
        q = student.resnet(batch["pixel_values"]).pooler_output.flatten(1)
        p = teacher.resnet(batch["pixel_values"]).pooler_output.flatten(1)
    expected, _ = hkt_loss(q, p, student.classifier, teacher.classifier, batch["labels"], lam=0.6)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert_gradients_exactly_on([student], teacher)


def test_hcd_on_a_cnn_uses_its_stages_and_their_widths():
    from inhernet_hf.distill import feature_width, hcd_stages, pool_feature
    from inhernet_hf.students import stage_student

    teacher = tiny_resnet()
    student = stage_student(teacher, [1, 1])
    stages, dims = hcd_stages(student.config)
    assert stages == [1, 2] and dims == [8, 16] and feature_width(teacher.config) == 16
    with pytest.raises(ValueError, match="a CNN's HCD stages are its 2 stages: num_stages must be 2 or unset"):
        hcd_stages(student.config, 3)
    hidden = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(pool_feature(hidden), torch.tensor([[5.5, 17.5]]))
    branches = HCDBranches(dims, 16, num_labels=3)
    loss, logs = HCDLoss(teacher, branches, stages)(student, images())
    loss.backward()
    assert_gradients_exactly_on([student, branches], teacher)
    assert all(p.grad.abs().sum() > 0 for p in branches.parameters())
