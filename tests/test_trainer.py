"""HF Trainer on an inherited model: the transformers model inside (`InherModel.base_model`, a PreTrainedModel whose
config carries the inheritance) trains, `save_model` writes the inherited format, and AutoModelForCausalLM reloads it
with the trained weights."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import inhernet_hf  # noqa: F401  (AutoModel* read inherited checkpoints)
from inhernet_hf import InherConfig, InherLinear, get_inher_model
from reference import tiny_llama


def test_trainer_trains_saves_and_reloads_the_inherited_model(tmp_path):
    inherited = get_inher_model(tiny_llama(), InherConfig(r=6, num_heads=2), progressbar=False)
    model = inherited.base_model
    before = model.model.layers[0].mlp.down_proj.inher_up.weight.detach().clone()
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.inher_up.weight, before)  # it trained
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, InherLinear)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
