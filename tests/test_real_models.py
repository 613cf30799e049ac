"""Acceptance on real pretrained weights: MiniLM-L6 (BERT) and SmolLM2-135M (Llama, GQA), offline.

For every default target: the inherited layer's output at init equals U_r S_r V_r^T x + b (float64
reference) to 1e-5 relative; the whole model's logits equal those of the same model with each target
weight overwritten by its W_r, to 1e-4 relative; target_ratio=0.5 keeps 0.49-0.51 of the parameters.
"""

import copy
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from inhernet_hf import InherConfig, InherLinear, InherModel, get_inher_model
from reference import SMOLLM2_GGUF, minilm_path, rank_r_reference, rel_err, smollm2_dir

pytestmark = pytest.mark.slow
BLOCK = re.compile(r"\.(layer|layers)\.\d+\.")
TEXT = ["Knowledge inheritance compresses a teacher into a smaller network.",
        "The quick brown fox jumps over the lazy dog, twice."]


def inherit_and_compare(model, config, batch, expected_targets):
    """Inherit `model` and check per-layer outputs and whole-model logits against float64 rank-r references."""
    model.eval()
    reference = copy.deepcopy(model)
    inherited = get_inher_model(model, config, progressbar=False)
    rows = inherited.inher_report.rows
    assert [r.name for r in rows] == expected_targets
    assert all(r.inherited for r in rows), [r.name for r in rows if not r.inherited]

    captured = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: captured.__setitem__(name, (args[0], out)))
             for n, m in inherited.named_modules() if isinstance(m, InherLinear)]
    with torch.no_grad():
        logits = inherited(**batch).logits
    for hook in hooks:
        hook.remove()
    assert sorted(captured) == sorted(expected_targets)

    worst = 0.0
    with torch.no_grad():
        for row in rows:
            dense = reference.get_submodule(row.name)
            w_r = rank_r_reference(dense.weight, row.rank)
            x, y = captured[row.name]
            expected = x.double() @ w_r.T + (0 if dense.bias is None else dense.bias.double())
            worst = max(worst, rel_err(y, expected))
            dense.weight.copy_(w_r.to(dense.weight.dtype))
        ref_logits = reference(**batch).logits
    assert worst < 1e-5, f"worst per-layer relative error {worst:.2e}"
    assert rel_err(logits, ref_logits) < 1e-4
    return inherited


def default_targets(model):
    """Independent of the library: every Linear inside the repeated blocks (`...layer.N.` / `...layers.N.`)."""
    return [n for n, m in model.named_modules() if BLOCK.search(n) and isinstance(m, nn.Linear)]


def targeted_ratio(model, config, targets):
    before = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel()
                 if model.get_submodule(n).bias is not None else model.get_submodule(n).weight.numel()
                 for n in targets)
    inherited = get_inher_model(model, config, progressbar=False)
    after = sum(p.numel() for n in targets for p in inherited.get_submodule(n).parameters())
    return after / before, after, before, inherited.inher_report


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    batch = dict(AutoTokenizer.from_pretrained(path)(TEXT, padding=True, return_tensors="pt"))
    return model, batch


@pytest.fixture(scope="module")
def smollm2():
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    return model, dict(tokenizer(TEXT, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("heads", [1, 2])
def test_minilm_init_is_rank_r_teacher(minilm, heads):
    base, batch = minilm
    model = copy.deepcopy(base)
    targets = default_targets(model)
    assert len(targets) == 6 * 6  # q, k, v, attention out, intermediate, output in each of 6 layers
    config = InherConfig(target_ratio=0.5, num_heads=heads, task_type="SEQ_CLS")
    inherited = inherit_and_compare(model, config, batch, targets)
    assert type(inherited.classifier) is nn.Linear and inherited.classifier.weight.requires_grad
    assert type(inherited.bert.pooler.dense) is nn.Linear


def test_minilm_target_ratio_is_kept(minilm):
    model = copy.deepcopy(minilm[0])
    ratio, after, before, report = targeted_ratio(model, InherConfig(target_ratio=0.5, num_heads=2),
                                                  default_targets(model))
    assert 0.49 <= ratio <= 0.51, ratio
    assert (report.params, report.dense_params) == (after, before)


def test_smollm2_init_is_rank_r_teacher_and_ratio(smollm2):
    model, batch = copy.deepcopy(smollm2[0]), smollm2[1]
    targets = default_targets(model)
    assert len(targets) == 30 * 7  # q, k, v, o, gate, up, down in each of 30 layers
    fresh = copy.deepcopy(model)
    inherited = inherit_and_compare(model, InherConfig(target_ratio=0.5, num_heads=2), batch, targets)
    assert type(inherited.lm_head) is nn.Linear
    k_rank = {r.rank for r in inherited.inher_report.rows if r.name.endswith("k_proj")}
    assert len(k_rank) == 1  # one rank per layer shape
    ratio, after, before, report = targeted_ratio(fresh, InherConfig(target_ratio=0.5, num_heads=2), targets)
    assert 0.49 <= ratio <= 0.51, ratio
    assert (report.params, report.dense_params) == (after, before)


def assert_round_trip(inherited, auto_class, batch, folder, generate=False):
    """Logits (and greedy generations) bitwise equal after InherModel and plain AutoModel reloads."""
    inherited.eval()
    inherited.save_pretrained(folder)
    with torch.no_grad():
        logits = inherited(**batch).logits
        tokens = inherited.generate(**batch, max_new_tokens=12, do_sample=False) if generate else None
    for loaded in (InherModel.from_pretrained(folder), auto_class.from_pretrained(folder)):
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, logits)
            if generate:
                assert torch.equal(loaded.generate(**batch, max_new_tokens=12, do_sample=False), tokens)


def test_minilm_round_trip_after_training(minilm, tmp_path):
    base, batch = minilm
    inherited = get_inher_model(copy.deepcopy(base), InherConfig(target_ratio=0.5, num_heads=2, task_type="SEQ_CLS"),
                                progressbar=False)
    inherited.train()
    optimizer = torch.optim.AdamW(inherited.parameters(), lr=1e-3)
    before = inherited.bert.encoder.layer[0].attention.self.query.inher_up.weight.clone()
    for _ in range(3):
        inherited(**batch, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, inherited.bert.encoder.layer[0].attention.self.query.inher_up.weight)
    assert_round_trip(inherited, AutoModelForSequenceClassification, batch, tmp_path / "minilm")


def test_smollm2_round_trip_with_generation(smollm2, tmp_path):
    model, batch = copy.deepcopy(smollm2[0]), smollm2[1]
    inherited = get_inher_model(model, InherConfig(target_ratio=0.5, num_heads=2, task_type="CAUSAL_LM"),
                                progressbar=False)
    assert_round_trip(inherited, AutoModelForCausalLM, batch, tmp_path / "smollm2", generate=True)


def test_a_gguf_file_without_its_model_is_refused():
    from inhernet_hf.offline_models import model_or_smollm2

    with pytest.raises(ValueError, match="--gguf_file other.gguf needs --model_name_or_path"):
        model_or_smollm2(None, "other.gguf")
