"""HF Trainer and TRL's SFTTrainer on what `get_inher_model` returns (an InherModel, which is the PreTrainedModel):
it trains, `save_model` writes the inherited format, and AutoModelForCausalLM reloads it with the trained weights."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import inhernet_hf  # noqa: F401  (AutoModel* read inherited checkpoints)
from inhernet_hf import InherConfig, InherLinear, InherModel, get_inher_model
from inhernet_hf.offline_models import smollm2_path
from reference import tiny_llama


def test_trainer_trains_saves_and_reloads_the_inherited_model(tmp_path):
    model = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=2), progressbar=False)
    before = model.model.layers[0].mlp.down_proj.inher_up.weight.detach().clone()
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)  # a PreTrainedModel: no warning, no wrapper
    trainer.train()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.inher_up.weight, before)  # it trained
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, InherLinear)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_sft_trainer_trains_and_saves_inherited_smollm2(tmp_path):
    """TRL's SFTTrainer, unchanged, on real SmolLM2-135M inherited at ratio 0.5 with two gated heads: two steps on
    text rows (TRL tokenizes them), then `save_model` and an AutoModelForCausalLM reload with identical logits."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    dense = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model = get_inher_model(dense, InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)
    layer = model.model.layers[3].self_attn.q_proj
    before = layer.inher_up.weight.detach().clone()
    text = ["The cat sat on the mat.", "Inheritance compresses a network by factoring its weights.",
            "Two plus two is four.", "Paris is the capital of France."]
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-4,
                     report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, max_length=32,
                     bf16=False)  # TRL defaults to bf16 autocast, which the float32 comparison below does not want
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": text}),
                         processing_class=tokenizer)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    assert not torch.equal(layer.inher_up.weight, before)  # it trained
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert isinstance(reloaded, InherModel) and isinstance(reloaded.model.layers[3].self_attn.q_proj, InherLinear)
    ids = tokenizer(text[:2], return_tensors="pt", padding=True).input_ids
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
