"""head_init="fitted": gate and heads fitted at inheritance time on calibration tokens (inhernet_hf/heads.py), on the
real MiniLM-L6: never worse than identical heads on the fit tokens, measured through the layer's own forward;
parameter counts unchanged; the fit survives save/load."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import inhernet_hf  # noqa: F401  (AutoModel reads inherited checkpoints)
from inhernet_hf import InherConfig, InherLinear, get_inher_model
from inhernet_hf.calibration import block_statistics
from reference import minilm_path

SENTENCES = [  # 32 distinct sentences: repeated rows would let the heads interpolate them
    "The film is a charming, funny and moving portrait of a family.", "A dull, lifeless script sinks the cast.",
    "Stocks fell sharply on Monday as investors weighed the rate decision.", "Add the flour and stir gently.",
    "The committee approved the budget after a long debate.", "He missed the train and walked home in the rain.",
    "Neural networks learn representations from data.", "What time does the museum open on Sundays?",
    "The river flooded the valley twice in one decade.", "Please send the signed contract by Friday noon.",
    "Her violin solo silenced the crowded hall.", "Photosynthesis turns light into chemical energy.",
    "The referee waved play on despite the protests.", "Our flight was delayed by a thunderstorm over Denver.",
    "A pinch of salt brings out the sweetness of caramel.", "The senator denied every allegation in the report.",
    "Glaciers carved these fjords over thousands of years.", "The startup raised twelve million dollars in seed money.",
    "My grandmother kept bees behind the orchard.", "The compiler rejected the program with a type error.",
    "Tickets for the final sold out within minutes.", "The detective noticed mud on the visitor's boots.",
    "Interest rates rose for the third straight quarter.", "Children built a snowman taller than their father.",
    "The novel's ending left readers arguing for weeks.", "Volcanic ash grounded flights across northern Europe.",
    "He repaired the old radio with parts from a junkyard.", "The vaccine trial enrolled thirty thousand adults.",
    "A stray cat adopted the lighthouse keeper.", "The orchestra premiered a symphony written in exile.",
    "Rain is expected to clear by Thursday afternoon.", "The museum returned the statue to its country of origin.",
]


def calibration(tokenizer) -> list[dict]:
    return [dict(tokenizer(SENTENCES[i:i + 8], return_tensors="pt", padding=True)) for i in range(0, 32, 8)]


@pytest.fixture(scope="module")
def minilm():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return lambda: AutoModel.from_pretrained(minilm_path()).eval(), tokenizer


def test_fitted_heads_beat_identical_heads_through_the_layer_forward(minilm):
    """On two real layers (attention query, MLP output), rank 16 and 200 fit tokens: the output error of the layer's
    own forward on its calibration inputs, fitted vs the identical-heads start, and the objective the fit reports."""
    load, tokenizer = minilm
    model = load()
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
    statistics = {}
    for grams, samples in block_statistics(model, names, calibration(tokenizer), progressbar=False,
                                           token_samples=200):
        statistics.update({n: (grams[n], samples[n]) for n in grams if n in names})
    for name in names:
        dense = model.get_submodule(name)
        gram, x = statistics[name]
        assert x.shape == (200, dense.in_features)
        layer = InherLinear(dense.in_features, dense.out_features, 16, num_heads=2).double()
        layer.inherit_(dense.weight, dense.bias, "whitened", "fitted", gram=gram)
        target = x.double() @ dense.weight.double().T + dense.bias.double()
        with torch.no_grad():
            start = (layer(x.double()) - target).square().sum().item()
            fit = layer.fit_heads_(dense.weight, x)
            fitted = (layer(x.double()) - target).square().sum().item()
        assert fit.start == pytest.approx(start, rel=1e-9)  # the objective is the layer's own output error
        assert fit.objective == pytest.approx(fitted, rel=1e-6)
        assert fitted < 0.98 * start, (name, fitted / start)  # strictly better, by a margin, on a real layer
        assert not torch.equal(*layer.inher_up.weight.split(16, dim=1))  # the heads differ now


def test_fitted_model_has_the_same_parameters_and_reports_its_fit(minilm, tmp_path):
    load, tokenizer = minilm
    batches = calibration(tokenizer)
    common = {"target_ratio": 0.5, "num_heads": 2, "init": "whitened", "head_fit_tokens": 256}
    balanced = get_inher_model(load(), InherConfig(**common), calibration_data=batches, progressbar=False)
    fitted = get_inher_model(load(), InherConfig(**common, head_init="fitted"), calibration_data=batches,
                             progressbar=False)
    assert fitted.inher_report.params == balanced.inher_report.params
    assert sum(p.numel() for p in fitted.parameters()) == sum(p.numel() for p in balanced.parameters())
    errors = [r.fit_error for r in fitted.inher_report.rows]
    assert len(errors) == 36 and all(e <= 1.0 for e in errors) and sum(errors) / len(errors) < 0.99
    assert "fit error" in str(fitted.inher_report)
    fitted.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert [r.fit_error for r in reloaded.inher_report.rows] == errors
    batch = batches[0]
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, fitted.eval()(**batch).last_hidden_state)


def test_one_head_fitted_is_balanced(minilm):
    load, tokenizer = minilm
    batches = calibration(tokenizer)
    common = {"target_ratio": 0.5, "num_heads": 1, "init": "whitened"}
    one = get_inher_model(load(), InherConfig(**common), calibration_data=batches, progressbar=False)
    fitted = get_inher_model(load(), InherConfig(**common, head_init="fitted"), calibration_data=batches,
                             progressbar=False)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), fitted.state_dict().values()))
    assert all(r.fit_error is None for r in fitted.inher_report.rows)


@pytest.mark.parametrize("bad, message", [
    ({"init": "svd"}, r"needs init='whitened'.*got \{'init': 'svd'\}"),
    ({"init": "whitened", "gate": "none"}, r"got \{'gate': 'none'\}"),
    ({"init": "whitened", "gate_input": "input"}, r"got \{'gate_input': 'input'\}"),
    ({"init": "whitened", "structure": "symmetric"}, r"got \{'structure': 'symmetric'\}"),
    ({"init": "whitened", "head_fit_tokens": 0}, r"head_fit_tokens=0 must be an int >= 1"),
])
def test_fitted_needs_a_whitened_shared_latent_gate(bad, message):
    with pytest.raises(ValueError, match=message):
        InherConfig(r=8, head_init="fitted", **bad)
