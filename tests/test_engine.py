"""Compression engine: whitened init reaches its closed-form optimum, the block-by-block pipeline, rank budgets,
calibration errors (model untouched), and the `inhernet` CLI on real models."""

import copy
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from inhernet_hf import InherConfig, InherLinear, get_inher_model
from inhernet_hf.factor import spectrum
from inhernet_hf.layer import inher_num_params
from recipes import DATA_DIR
from reference import minilm_path, rank_r_reference, requires_cuda, tiny_llama



def output_error(weight, layer, x):
    """||(W x + b) - layer(x)||^2 over the rows of x, in float64."""
    with torch.no_grad():
        return (x.double() @ weight.double().T - layer(x.double()) + layer.inher_bias[0].double()).square().sum().item()


@pytest.mark.parametrize("n_tokens", [400, 20])  # 20 < in = 48: X^T X is singular, the eigen fallback runs
def test_whitened_init_reaches_closed_form_minimum(n_tokens):
    torch.manual_seed(0)
    dense = nn.Linear(48, 40)
    x = torch.randn(n_tokens, 48) @ torch.randn(48, 48)  # correlated inputs
    gram = x.double().T @ x.double()
    rank = 12
    layer = InherLinear(48, 40, rank, num_heads=2)
    layer.inherit_(dense.weight, dense.bias, init="whitened", gram=gram)
    layer.double()
    minimum = spectrum(dense.weight, gram)[rank:].square().sum().item()
    assert output_error(dense.weight, layer, x) == pytest.approx(minimum, rel=1e-4)
    plain = x.double() @ (dense.weight.double() - rank_r_reference(dense.weight, rank)).T
    assert output_error(dense.weight, layer, x) <= plain.square().sum().item()


def engine_llama(hidden_size=64, num_hidden_layers=3):
    return tiny_llama(vocab_size=96, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)


def calibration(n_batches=3, batch=4, length=24):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (batch, length), generator=generator)} for _ in range(n_batches)]


def plain_inputs(model, targets: list[str], batch: dict) -> dict:
    """Each target's (first) input in one plain forward over `batch`, nothing replaced: {target: tensor}."""
    seen = {}
    hooks = [model.get_submodule(t).register_forward_pre_hook(lambda _m, a, t=t: seen.setdefault(t, a[0]))
             for t in targets]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def all_grams(model, targets: list[str], batches: list[dict]) -> dict:
    """{target: X^T X} from every group `block_grams` yields (nothing replaced in between)."""
    from inhernet_hf.calibration import block_grams

    grams = {}
    for group in block_grams(model, targets, batches, progressbar=False):
        grams.update(group)
    return grams


@requires_cuda
def test_calibration_on_a_cuda_model_with_cpu_batches_matches_the_cpu_run():
    """A model on the GPU calibrates from CPU batches (moved per forward): activation ranks and whitened factors as
    on the CPU, so the two inherited models compute the same logits (to float32 rounding)."""
    config = dict(target_ratio=0.5, num_heads=2, init="whitened", rank_allocation="activation")
    batches = calibration()
    on_cpu = get_inher_model(engine_llama(), InherConfig(**config), calibration_data=batches, progressbar=False)
    on_cuda = get_inher_model(engine_llama().cuda(), InherConfig(**config), calibration_data=batches, progressbar=False)
    assert [r.rank for r in on_cuda.inher_report.rows] == [r.rank for r in on_cpu.inher_report.rows]
    with torch.no_grad():
        expected = on_cpu(**batches[0], use_cache=False).logits
        logits = on_cuda(**{k: v.cuda() for k, v in batches[0].items()}, use_cache=False).logits.cpu()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_block_by_block_pipeline_is_optimal_for_the_inputs_each_layer_sees():
    """Each block is factored on the inputs that reach it through the already compressed blocks: re-running the
    final model, every layer's output error on its inputs equals the closed-form minimum for those inputs."""
    model = engine_llama()
    dense = copy.deepcopy(model)
    batches = calibration()
    inherited = get_inher_model(model, InherConfig(r=8, num_heads=2, init="whitened"), calibration_data=batches,
                                progressbar=False)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
             for n, m in inherited.named_modules() if isinstance(m, InherLinear)]
    with torch.no_grad():
        for batch in batches:
            inherited(**batch, use_cache=False)
    for hook in hooks:
        hook.remove()
    assert len(inputs) == 3 * 7
    for name, chunks in inputs.items():
        x = torch.cat(chunks)
        gram = x.double().T @ x.double()
        weight = dense.get_submodule(name).weight
        minimum = spectrum(weight, gram)[8:].square().sum().item()
        layer = inherited.get_submodule(name)
        err = (x.double() @ weight.double().T - layer(x).double()).square().sum().item()
        assert err == pytest.approx(minimum, rel=1e-3), name


def test_output_sensitivity_ignores_padding():
    """The Fisher scalars of padded examples equal those of the same examples unpadded: each example runs alone,
    without its padding positions."""
    from inhernet_hf.calibration import output_sensitivity

    model = engine_llama().eval()
    targets = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    ids = calibration(n_batches=1, batch=2, length=10)[0]["input_ids"]
    plain = output_sensitivity(model, targets, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :6]}], progressbar=False)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    padded = output_sensitivity(model, targets, [{"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}],
                                progressbar=False)
    assert padded == pytest.approx(plain, rel=1e-5)


def test_calibration_runs_without_dropout_and_restores_the_mode():
    """A model in train mode is calibrated in eval mode (dropout off: the same model as from an eval-mode copy) and
    handed back with every module in its own mode (a part the user froze in eval mode stays so; new layers take
    the mode of the layer they replace)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)).train()
    config = InherConfig(target_ratio=0.5, num_heads=2, init="whitened", rank_allocation="activation",
                         task_type="SEQ_CLS")
    inherited = {}
    for mode in (True, False):
        torch.manual_seed(1)  # the gates' random init
        model = copy.deepcopy(dense).train(mode)
        model.bert.embeddings.eval()
        inherited[mode] = get_inher_model(model, config, calibration_data=calibration(), progressbar=False)
    for (name, a), b in zip(inherited[True].state_dict().items(), inherited[False].state_dict().values()):
        assert torch.equal(a, b), name
    assert inherited[True].training and not inherited[False].training
    for mode, model in inherited.items():
        modes = {name: m.training for name, m in model.named_modules()}
        assert not any(v for k, v in modes.items() if k.startswith("bert.embeddings"))
        assert all(v == mode for k, v in modes.items() if k.startswith("bert.encoder"))  # InherLinear parts included


def test_whole_model_calibration_masks_what_the_encoder_mask_describes():
    """T5 (no single list of blocks): the encoder's grams and the cross-attention's key projection (it reads the
    encoder output) drop the encoder's padding rows; the decoder's own inputs are not described by that mask, so
    none of their rows are dropped even when both sequences have the same length."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                num_heads=2, decoder_start_token_id=0)).eval()
    ids = calibration(n_batches=1, batch=2, length=8)[0]["input_ids"]
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids.flip(1)}
    targets = ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q",
               "decoder.block.1.layer.1.EncDecAttention.k"]
    seen = plain_inputs(model, targets, batch)
    grams = all_grams(model, targets, [batch])
    for target, masked in zip(targets, (True, False, True)):
        rows = seen[target].reshape(-1, 32).double()
        rows = rows[mask.reshape(-1).bool()] if masked else rows
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_a_block_shared_across_depth_is_calibrated_on_every_call():
    """ALBERT runs its one layer num_hidden_layers times: its grams are the sum over every call's (unpadded) inputs,
    not the first call's alone (what a block-by-block pass would see)."""
    from transformers import AlbertConfig, AlbertModel

    from inhernet_hf.calibration import block_grams

    torch.manual_seed(0)
    model = AlbertModel(AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=48)).eval()
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    targets = [f"{layer}.attention.query", f"{layer}.attention.value", f"{layer}.ffn_output"]
    batches = calibration(n_batches=2, batch=2, length=8)
    batches[1]["attention_mask"] = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    inputs = {t: [] for t in targets}  # every call's input rows, padding dropped
    for batch in batches:
        keep = batch.get("attention_mask", torch.ones(2, 8, dtype=torch.long)).reshape(-1).bool()
        hooks = [model.get_submodule(t).register_forward_pre_hook(
            lambda _m, a, t=t: inputs[t].append(a[0].reshape(-1, a[0].shape[-1])[keep].double())) for t in targets]
        with torch.no_grad():
            model(**batch)
        for hook in hooks:
            hook.remove()
    assert [len(inputs[t]) for t in targets] == [2 * 3] * 3  # each batch runs the shared layer three times
    expected = {t: sum(rows.T @ rows for rows in inputs[t]) for t in targets}
    (grams,) = list(block_grams(model, targets, batches, progressbar=False))
    for target in targets:
        torch.testing.assert_close(grams[target], expected[target], rtol=1e-5, atol=1e-4)


def test_unpadded_row_cuts_only_what_the_mask_describes():
    from inhernet_hf.calibration import _unpadded_row

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    ids, decoder_ids = torch.arange(12).view(3, 4), torch.arange(100, 112).view(3, 4)
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids, "labels": decoder_ids}
    seq2seq = _unpadded_row(batch, 1, encoder_decoder=True)
    assert seq2seq["input_ids"].tolist() == [[4, 5]] and seq2seq["attention_mask"].tolist() == [[1, 1]]
    assert seq2seq["decoder_input_ids"].tolist() == seq2seq["labels"].tolist() == [[104, 105, 106, 107]]
    causal = _unpadded_row({"input_ids": ids, "attention_mask": mask, "labels": ids}, 1, encoder_decoder=False)
    assert causal["input_ids"].tolist() == causal["labels"].tolist() == [[4, 5]]
    assert _unpadded_row(batch, 0, encoder_decoder=True)["input_ids"].tolist() == [[0, 1, 2, 3]]
    assert _unpadded_row(batch, 2, encoder_decoder=True) is None  # all padding: nothing to run


def test_ragged_tokenized_dataset_is_padded_by_the_tokenizer():
    """A `datasets.Dataset` mapped through a tokenizer without padding (rows of different lengths) is padded per batch
    by the tokenizer given; without one the error says what to do."""
    import datasets
    from transformers import AutoTokenizer

    from inhernet_hf.calibration import prepare_calibration

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["a short one", "a somewhat longer calibration sentence", "mid length text", "x"]
    dataset = datasets.Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns="text")
    batches = prepare_calibration(dataset, tokenizer, batch_size=3)
    expected = tokenizer(texts[:3], padding=True, return_tensors="pt")
    assert len(batches) == 2 and batches[1]["input_ids"].shape == (1, 3)  # [CLS] x [SEP]
    assert torch.equal(batches[0]["input_ids"], expected["input_ids"])
    assert torch.equal(batches[0]["attention_mask"], expected["attention_mask"])
    with pytest.raises(ValueError, match=r"rows 0\.\.2 have different lengths; pass `tokenizer=` to pad them"):
        prepare_calibration(dataset, batch_size=3)


@pytest.mark.parametrize("allocation", ["energy", "activation"])
def test_allocation_meets_budget_with_min_rank_multiple_and_pattern(allocation):
    model = engine_llama(hidden_size=128, num_hidden_layers=4)
    config = InherConfig(target_ratio=0.5, num_heads=2, rank_allocation=allocation, min_rank=8, rank_multiple=4,
                         rank_pattern={r"layers\.0\.mlp\.down_proj": 20})
    inherited = get_inher_model(model, config, calibration_data=calibration() if allocation == "activation" else None,
                                progressbar=False)
    report = inherited.inher_report
    assert abs(report.ratio - 0.5) <= 0.01, report.ratio
    measured = sum(p.numel() for r in report.rows for p in inherited.get_submodule(r.name).parameters())
    assert measured == report.params
    ranks = {r.name: r.rank for r in report.rows}
    assert ranks.pop("model.layers.0.mlp.down_proj") == 20  # rank_pattern stays exact
    inherited_ranks = [r for r in ranks.values() if r is not None]
    assert all(r >= 8 and r % 4 == 0 for r in inherited_ranks)
    assert len(set(inherited_ranks)) > 1  # ranks really differ across layers


@pytest.mark.parametrize("ratio, heads, nearest, fitted", [
    (0.8, 3, {"q_proj": 112, "k_proj": 80, "v_proj": 80, "o_proj": 112, "gate_proj": 144, "up_proj": 144,
              "down_proj": 224}, {"gate_proj": 128, "up_proj": 128}),
    (0.5, 2, {"q_proj": 96, "k_proj": 64, "v_proj": 64, "o_proj": 96, "gate_proj": 128, "up_proj": 128,
              "down_proj": 160}, {"q_proj": 80, "o_proj": 80}),
])
def test_uniform_ranks_never_exceed_the_ratio(ratio, heads, nearest, fitted):
    """SmolLM2-135M's projection shapes with rank_multiple 16 (recipes/speed.py). Rounded to the nearest multiple, the
    ranks keep more than the ratio (0.8, M = 3: gate/up get 144 for 136.45 asked, down 224 for 216.64). One shape goes
    down one step: at 0.8 gate/up (the only step that closes the gap alone: -16 * 5187 * 2 against 0.027 of the
    block), at 0.5 q/o (the cheapest step that closes it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3))
    shapes = {n.split(".")[-1]: model.get_submodule(n).weight.shape for n, _ in model.named_modules()
              if n.endswith("_proj")}
    dense = sum(o * i for o, i in shapes.values())
    held_nearest = sum(inher_num_params(i, o, nearest[n], heads, False) for n, (o, i) in shapes.items())
    assert held_nearest / dense > ratio  # the case is real: nearest rounding overshoots
    report = get_inher_model(model, InherConfig(target_ratio=ratio, num_heads=heads, rank_multiple=16, init="random"),
                             progressbar=False).inher_report
    assert {r.name.split(".")[-1]: r.rank for r in report.rows} == {**nearest, **fitted}
    held = sum(inher_num_params(i, o, {**nearest, **fitted}[n], heads, False) for n, (o, i) in shapes.items())
    assert report.params == held and report.ratio == held / dense <= ratio
    assert report.ratio == pytest.approx({0.8: 0.78025, 0.5: 0.49867}[ratio], abs=1e-5)


def test_activation_allocation_differs_from_energy():
    configs = {a: InherConfig(target_ratio=0.5, num_heads=1, rank_allocation=a) for a in ("energy", "activation")}
    ranks = {}
    for allocation, config in configs.items():
        report = get_inher_model(engine_llama(), config, progressbar=False,
                                 calibration_data=calibration() if allocation == "activation" else None).inher_report
        ranks[allocation] = [r.rank for r in report.rows]
    assert ranks["energy"] != ranks["activation"]


def test_fisher_of_a_regression_head_is_the_gaussian_one():
    """A one-output regression head (STS-B): the sampled-label loss is 0.5 (y_hat - y)^2 with y ~ N(y_hat, 1), so the
    gradient at the head's output is -eps and its Fisher scalar is the mean of the drawn eps^2 (a cross-entropy over
    one logit has zero gradient: every layer would score 0). Earlier layers get positive scalars too."""
    from transformers import BertConfig, BertForSequenceClassification

    from inhernet_hf.calibration import output_sensitivity

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=1)).eval()
    batches = calibration(n_batches=2, batch=3, length=8)
    targets = ["classifier", "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    sensitivity = output_sensitivity(model, targets, batches, seed=5, progressbar=False)
    generator = torch.Generator().manual_seed(5)
    draws = torch.cat([torch.randn((1, 1), generator=generator) for _ in range(6)])  # one per example, in order
    assert sensitivity["classifier"] == pytest.approx(draws.square().mean().item(), rel=1e-6)
    assert all(sensitivity[t] > 0 for t in targets[1:])


def assert_untouched(model, reference):
    assert not any(isinstance(m, InherLinear) for m in model.modules())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "config, data, error, message",
    [
        (dict(r=4, init="whitened"), None, ValueError, "needs calibration data"),
        (dict(r=4, init="whitened"), [], ValueError, "calibration_data is empty"),
        (dict(r=4, init="whitened"), "some text", TypeError, "iterable of dict batches"),
        (dict(r=4, init="whitened"), [torch.zeros(2, 3)], TypeError, "batch 0 is a Tensor"),
        (dict(r=4, init="whitened"), [{"input_ids": [1, 2]}], TypeError, "batch 0 holds no tensors"),
        (dict(r=4, init="whitened"), [{"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                       "inputs_embeds": torch.full((1, 4, 64), float("nan"))}],
         ValueError, "batch 0 has NaN or Inf values in 'inputs_embeds'"),
        (dict(r=4, init="whitened"), [{"input_ids": torch.zeros(0, 4, dtype=torch.long)}], ValueError,
         r"batch 0 has no rows: 'input_ids' has shape \(0, 4\)"),
        (dict(r=4, init="whitened"), [{"input_ids": torch.ones(2, 4, dtype=torch.long),
                                       "attention_mask": torch.zeros(2, 4, dtype=torch.long)}], ValueError,
         "every input row this layer saw was zero or padding"),
        (dict(r=4), calibration(), ValueError, "calibration_data was given but init='svd'"),
        (dict(target_ratio=0.3, rank_allocation="energy", rank_pattern={r"mlp\.\w+_proj": 24}), None, ValueError,
         "target_ratio=0.3 cannot be met: the rank_pattern layers alone hold 64,962 parameters"),  # 3*(2*7730+6194)
        (dict(target_ratio=0.5, rank_pattern={"mlp": 8}), None, ValueError,
         r"rank_pattern keys \['mlp'\] match no targeted module"),
        (dict(target_ratio=0.05, rank_allocation="energy", min_rank=16), None, ValueError,
         "target_ratio=0.05 cannot be met: min_rank=16"),
        (dict(target_ratio=0.05, min_rank=16), None, ValueError,
         r"target_ratio=0.05 cannot be met with rank_allocation='uniform': at min_rank=16 \(rank_multiple=1\)"),
        (dict(r=4, rank_multiple=8, rank_pattern={"down_proj": 0.2}), None, ValueError,  # 3 * (8*128 + 2*8*64 + 18)
         "the rank_pattern ratio 0.2 cannot be met with rank_allocation='uniform': .* 6,198 parameters, above the "
         "budget of 4,915"),
    ],
)
def test_bad_requests_fail_clearly_and_leave_model_untouched(config, data, error, message):
    model = engine_llama()
    reference = copy.deepcopy(model)
    with pytest.raises(error, match=message):
        get_inher_model(model, InherConfig(**config), calibration_data=data, progressbar=False)
    assert_untouched(model, reference)


def test_activation_allocation_without_logits_is_a_clear_error():
    model = engine_llama().model  # LlamaModel: hidden states, no logits
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match="needs a model whose outputs have logits.*LlamaModel returns BaseModelOutput"):
        get_inher_model(model, InherConfig(target_ratio=0.5, rank_allocation="activation",
                                           target_modules=["q_proj", "v_proj"]),
                        calibration_data=calibration(), progressbar=False)
    assert_untouched(model, reference)
    assert all(p.requires_grad for p in model.parameters())


def test_rank_allocation_needs_a_ratio():
    with pytest.raises(ValueError, match="rank_allocation='energy' distributes a parameter budget"):
        InherConfig(r=8, rank_allocation="energy")


@pytest.mark.slow
def test_cli_compress_then_report_on_real_minilm(tmp_path):
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found under {DATA_DIR}")
    cli = [sys.executable, "-m", "inhernet_hf.cli"]
    out = subprocess.run(cli + ["compress", minilm_path(), "--target-ratio", "0.5",
                                "--num-heads", "2", "--init", "whitened", "--rank-allocation", "energy",
                                "--calibration-data", str(DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"),
                                "--calibration-samples", "16", "--calibration-seq-len", "64",
                                "--output", str(tmp_path / "minilm")], capture_output=True, text=True, check=True)
    assert "saved to" in out.stdout
    report = subprocess.run(cli + ["report", str(tmp_path / "minilm"), "--plot", str(tmp_path / "plot.png")],
                            capture_output=True, text=True, check=True).stdout
    inherited, dense = map(int, re.search(r"total \((\d+) inherited, (\d+) kept dense\)", report).groups())
    assert inherited + dense == 36 and inherited > 0  # 6 layers x 6 projections
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ratio = float(report.split("ratio ")[-1].split()[0])
    assert abs(ratio - 0.5) <= 0.01


@pytest.mark.parametrize("flags, message", [
    (["--target-ratio", "1.5"], "InherConfig.target_ratio=1.5 is not a valid ratio"),
    (["--target-ratio", "0.5", "--num-heads", "0"], "InherConfig.num_heads=0 must be an int >= 1"),
    (["--r", "8", "--rank-allocation", "energy"], "give `target_ratio` instead of `r`"),
    (["--target-ratio", "0.5", "--init", "whitened", "--calibration-data", "x.txt", "--calibration-samples", "0"],
     "--calibration-samples must be >= 1, got 0"),
    (["--target-ratio", "0.5", "--init", "whitened", "--calibration-data", "x.txt", "--calibration-seq-len", "2000"],
     "--calibration-seq-len 2000 exceeds the model's max_position_embeddings (512)"),
    (["--target-ratio", "0.5", "--rank-allocation", "activation", "--calibration-samples", "2",
      "--calibration-seq-len", "16", "--calibration-data", str(DATA_DIR / "wikitext-2-raw" / "wiki.test.raw")],
     "rank_allocation='activation' needs a model whose outputs have logits"),  # MiniLM's folder is a BertModel
])
def test_cli_compress_bad_input_is_a_one_line_error(flags, message, tmp_path):
    from inhernet_hf import cli

    if "activation" in flags and not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"WikiText-2 not found under {DATA_DIR}")
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", minilm_path(), "--output", str(tmp_path / "out"), "--device", "cpu", *flags])
    assert str(info.value).startswith("inhernet compress: ") and message in str(info.value)
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_block_calibration_gives_each_block_its_own_mask_and_rotary_table(model_type):
    """Gemma's sliding-window and full-attention layers are called with different attention masks (and, in Gemma
    3, different rotary tables). Block by block, each block's X^T X equals the one of a plain forward pass (nothing
    replaced), so each block ran with its own arguments, not the first block's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    targets = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}]
    seen = plain_inputs(model, targets, batches[0])
    grams = all_grams(model, targets, batches)
    for target in targets:
        rows = seen[target].reshape(-1, 64).double()
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-6)


def tiny_llava(vision_feature_layer=-1):
    """A random 2-layer LLaVA (CLIP tower of 16 x 16 pixels: 4 x 4 patches) with a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=16, patch_size=4),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        image_token_index=63, vision_feature_layer=vision_feature_layer)).eval()


@pytest.mark.parametrize("language_model, require_grads", [(True, False), (False, False), (True, True)],
                         ids=["whole-model", "blocks", "input-require-grads-hooks"])
def test_the_text_mask_leaves_vision_rows_alone_when_their_counts_coincide(language_model, require_grads):
    """LLaVA with 17 tokens of text (16 image tokens) and a CLIP tower of 16 patches + CLS: 2 x 17 rows on both
    sides. The attention mask drops the text's padding rows; the tower's rows, which it does not describe, all stay.
    With the language model targeted too, calibration takes the whole-model pass; the tower alone, block by block.
    transformers' `enable_input_require_grads` (left behind by gradient checkpointing) makes the tower's patch
    embeddings require grad as well: the rule does not depend on requires_grad."""
    model = tiny_llava()
    if require_grads:
        model.enable_input_require_grads()
    ids = torch.cat([torch.full((2, 16), 63), torch.randint(0, 60, (2, 1))], 1)
    mask = torch.tensor([[1] * 17, [0] + [1] * 16])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16)}
    vision = "model.vision_tower.encoder.layers.1.self_attn.q_proj"
    text = "model.language_model.layers.1.self_attn.q_proj"
    targets = [vision, text] if language_model else [vision]
    seen = plain_inputs(model, targets, batch)
    assert seen[vision].shape[:2] == mask.shape  # the counts coincide
    grams = all_grams(model, targets, [batch])
    for target in targets:
        rows = seen[target].reshape(-1, 32).double()
        rows = rows[mask.reshape(-1).bool()] if target == text else rows
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_the_text_mask_applies_to_clip_text_and_not_to_its_vision_tower():
    """CLIPModel has no single input embedding (get_input_embeddings raises): the text tower is found through the
    embedding that reads the batch's input_ids. 17 text tokens, 16 patches + CLS: the counts coincide."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, eos_token_id=63),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4))).eval()
    ids = torch.randint(1, 60, (2, 17))
    ids[:, -1] = 63
    mask = torch.tensor([[1] * 17, [1] * 12 + [0] * 5])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16)}
    vision, text = "vision_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.1.mlp.fc1"
    seen = plain_inputs(model, [vision, text], batch)
    assert seen[vision].shape[:2] == seen[text].shape[:2] == mask.shape
    grams = all_grams(model, [vision, text], [batch])
    for target in (vision, text):
        rows = seen[target].reshape(-1, 32).double()
        rows = rows[mask.reshape(-1).bool()] if target == text else rows
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_calibration_of_a_model_that_writes_image_features_into_its_embeddings():
    """Kosmos-2 writes its image features into the token embeddings in place: neither the probe for off-text
    targets nor the output-sensitivity pass may make that tensor a leaf that requires grad (an in-place write into
    one is an error)."""
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    from inhernet_hf.calibration import output_sensitivity

    torch.manual_seed(0)
    model = Kosmos2ForConditionalGeneration(Kosmos2Config(
        text_config=dict(vocab_size=100, embed_dim=32, layers=2, attention_heads=4, ffn_dim=64,
                         max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        latent_query_num=4)).eval()
    image_positions = torch.zeros(2, 10, dtype=torch.long)
    image_positions[:, 1:5] = 1
    mask = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
    batch = {"input_ids": torch.randint(5, 100, (2, 10)), "attention_mask": mask,
             "pixel_values": torch.randn(2, 3, 16, 16), "image_embeds_position_mask": image_positions}
    vision, text = "vision_model.model.encoder.layers.1.mlp.fc1", "text_model.model.layers.1.ffn.fc1"
    seen = plain_inputs(model, [vision, text], batch)
    grams = all_grams(model, [vision, text], [batch])
    for target in (vision, text):
        rows = seen[target].reshape(-1, 32).double()
        rows = rows[mask.reshape(-1).bool()] if target == text else rows
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-5)
    sensitivity = output_sensitivity(model, [vision, text], [batch], progressbar=False)
    assert all(value > 0 for value in sensitivity.values())  # the image features reach the logits


def test_output_sensitivity_of_a_target_the_model_runs_under_no_grad():
    """A model may run part of itself under torch.no_grad() (CLIPSeg's backbone): the pass still measures how the
    loss depends on that target's output, and a model without get_input_embeddings is fine."""
    from types import SimpleNamespace

    from inhernet_hf.calibration import output_sensitivity

    class FrozenFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, pixel_values):
            with torch.no_grad():
                hidden = self.features(pixel_values)
            return SimpleNamespace(logits=self.head(hidden))

    torch.manual_seed(0)
    sensitivity = output_sensitivity(FrozenFeatures(), ["features", "head"], [{"pixel_values": torch.randn(4, 8)}],
                                     progressbar=False)
    assert sensitivity["features"] > 0 and sensitivity["head"] > 0


def test_output_sensitivity_of_flattened_image_patches_leaves_padding_out():
    """Qwen2-VL takes all images' patches flattened into one (patches, features) tensor, so a batch cannot be split
    by example (it used to fail there): it runs whole. Right padding added to both rows changes nothing, so the
    padding enters neither the loss nor the text targets' averages."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from inhernet_hf.calibration import output_sensitivity

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=99,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        image_token_id=90, vision_start_token_id=91, vision_end_token_id=92)).eval()
    ids = torch.randint(0, 80, (2, 12))
    ids[:, 2], ids[:, 3:7], ids[:, 7] = 91, 90, 92  # 4 merged image tokens of a 4 x 4 patch grid
    images = {"pixel_values": torch.randn(32, 24), "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])}
    batches = {}
    for name, pad in (("unpadded", 0), ("padded", 3)):
        tokens = torch.cat([ids, torch.zeros(2, pad, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(2, 12), torch.zeros(2, pad)], 1).long()
        batches[name] = {"input_ids": tokens, "attention_mask": mask, "mm_token_type_ids": (tokens == 90).long(),
                         **images}
    targets = ["model.visual.blocks.1.mlp.fc1", "model.language_model.layers.1.mlp.down_proj"]
    results = {name: output_sensitivity(model, targets, [batch], progressbar=False) for name, batch in batches.items()}
    assert all(value > 0 for value in results["unpadded"].values())
    for target in targets:
        assert results["padded"][target] == pytest.approx(results["unpadded"][target], rel=1e-4)


def test_inputs_embeds_batches_drop_their_padding_and_no_logits_are_computed():
    """A batch of inputs_embeds (no token ids to embed) is text: its padding rows are dropped. Block-by-block
    calibration never runs the LM head, whose logits (batch x length x vocabulary) it does not need."""
    model = engine_llama()
    embeds = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    batch = {"input_ids": None, "inputs_embeds": embeds, "attention_mask": mask}
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    seen = plain_inputs(model, targets, batch)
    head_calls = []
    hook = model.lm_head.register_forward_hook(lambda _m, _a, _out: head_calls.append(1))  # once it has run
    try:
        grams = all_grams(model, targets, [batch])
    finally:
        hook.remove()
    assert head_calls == []
    for target in targets:
        rows = seen[target].reshape(-1, seen[target].shape[-1])[mask.reshape(-1).bool()].double()
        torch.testing.assert_close(grams[target], rows.T @ rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init, allocation", [("whitened", "uniform"), ("svd", "activation")])
def test_targets_the_calibration_data_never_reaches_are_an_error(init, allocation):
    """LLaVA calibrated on text only: the vision tower's targets get no statistics. They used to be left dense while
    the report counted them as inherited (whitened), or failed with a KeyError (activation ranks)."""
    batches = [{"input_ids": torch.randint(0, 60, (2, 8))}]
    with pytest.raises(RuntimeError, match=r"Targets \['model.vision_tower.encoder.layers.0.*never ran"):
        get_inher_model(tiny_llava(), InherConfig(target_ratio=0.5, init=init, rank_allocation=allocation),
                        calibration_data=batches, progressbar=False)


def test_activation_ranks_reach_the_vision_tower_and_run_under_no_grad():
    """With pixel_values, the vision tower's outputs (not downstream of the input embeddings) get loss gradients
    too. LLaVA's default vision_feature_layer=-2 reads the tower before its last layer, which runs but does not
    reach the logits: sensitivity 0, not an error. The pass turns gradients on itself under torch.no_grad()."""
    from inhernet_hf.calibration import output_sensitivity

    ids = torch.cat([torch.full((2, 16), 63), torch.randint(0, 60, (2, 6))], 1)  # 16 image tokens: 4 x 4 patches
    batches = [{"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16)}]
    model = tiny_llava(vision_feature_layer=-2)
    tower = [f"model.vision_tower.encoder.layers.{i}.mlp.fc1" for i in (0, 1)]
    with torch.no_grad():
        used, unused = output_sensitivity(model, tower, batches, progressbar=False).values()
    assert used > 0 and unused == 0
    with torch.no_grad():
        inherited = get_inher_model(model, InherConfig(target_ratio=0.5, rank_allocation="activation"),
                                    calibration_data=batches, progressbar=False)
    assert inherited.inher_report.ratio <= 0.5


def test_targets_reading_one_input_share_one_gram():
    """q/k/v (and gate/up) read the same hidden states: one X^T X is held for the group, not a copy per target."""
    from inhernet_hf.calibration import block_grams

    model = engine_llama().eval()
    targets = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + ["model.layers.0.mlp.gate_proj",
                                                                        "model.layers.0.mlp.up_proj"]
    groups = list(block_grams(model, targets, calibration(n_batches=2, batch=2, length=8), progressbar=False))
    assert [sorted(g) for g in groups] == [sorted(targets[:3]), targets[3:4], targets[4:]]
    qkv, _, mlp = groups
    assert qkv[targets[0]] is qkv[targets[1]] is qkv[targets[2]]
    assert mlp[targets[4]] is mlp[targets[5]]


def test_gram_sums_are_shared_only_where_each_target_reads_the_groups_input_once():
    """Outside the block path a layer may run twice per pass (weight sharing): a(x), b(x), b(y) must give a x^T x
    and b x^T x + y^T y, not one sum for both."""
    from inhernet_hf.calibration import _GramHooks

    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    hooks = _GramHooks({"a": a, "b": b})
    hooks.new_batch(None)
    a(x), b(x), b(y)
    hooks.remove()
    torch.testing.assert_close(hooks.grams["a"], (x.T @ x).double())
    torch.testing.assert_close(hooks.grams["b"], (x.T @ x + y.T @ y).double())
