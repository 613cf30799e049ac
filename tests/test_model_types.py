"""Default targets inferred from the structure of 34 model types transformers ships (encoders, decoders,
encoder-decoders, MoE, vision, vision-language), each on a tiny random-init model (no Hub access).

For each model type: the default targets are exactly the Linear layers of every repeated block (attention and MLP
projections, cross-attention, shared experts; in every tower of multi-tower models), never routers, embeddings,
heads or projectors; at init the inherited model computes exactly the model whose targets are replaced by their
rank-r approximations (float64); forward and backward reach every `InherLinear` parameter; save/reload is exact.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from inhernet_hf import InherConfig, InherLinear, InherModel, get_inher_model
from inhernet_hf.targets import dense_weight, matches, resolve_target_spec
from reference import rank_r_reference, rel_err

VOCAB = 99
HIDDEN = 32
INTER = 64
SEQ = 8
BATCH = 2

# A Linear living inside a repeated transformer block: `...layer.3.`, `...layers.0.`, `...h.1.`, `...block.0.`,
# `...blocks.1.`. The defaults must take exactly these (plus per-model extras, minus routers), nothing outside them.
BLOCK_RE = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+\.")

_LLAMA_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=INTER, max_position_embeddings=64)
_BERT_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=INTER, max_position_embeddings=64)
_CLIP_VISION = dict(image_size=16, patch_size=8, hidden_size=HIDDEN, intermediate_size=INTER,
                    num_hidden_layers=2, num_attention_heads=2)
_CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=VOCAB - 1,
                  pad_token_id=0)
# Qwen-VL: 16x16 image, patch 4, temporal patch 2, merge 2 -> grid (1, 4, 4) = 16 patches -> 4 image tokens.
_QWEN_VL_TEXT = dict(_LLAMA_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 2, 4]})  # 2+2+4 = head_dim 16 / 2
QWEN_VL_IDS = dict(image_token_id=97, video_token_id=96, vision_start_token_id=95, vision_end_token_id=94)
QWEN_GRID = (1, 4, 4)
QWEN_PATCH, QWEN_TPATCH, QWEN_MERGE = 4, 2, 2
LLAVA_IMAGE_TOKEN = VOCAB - 1


def _text_ids(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB - 10, (batch, seq))


def _lm_inputs() -> dict:
    ids = _text_ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _vit_inputs() -> dict:
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16), "labels": torch.tensor([0, 2])}


def _seq2seq_inputs() -> dict:
    ids = _text_ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": _text_ids(seq=5)}


def _whisper_inputs() -> dict:
    return {"input_features": torch.randn(BATCH, 8, 16), "decoder_input_ids": _text_ids(seq=5)}


def _t5_inputs() -> dict:
    ids = _text_ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _text_ids(seq=5)}


def _dual_inputs() -> dict:
    ids = _text_ids()
    ids[:, -1] = VOCAB - 1  # CLIP pools the text tower at the first eos token
    return {"input_ids": ids, "pixel_values": torch.randn(BATCH, 3, 16, 16), "return_loss": True}


def _llava_inputs() -> dict:
    n_img = (16 // 8) ** 2  # patches of the 16x16 image; the "default" strategy drops CLS
    ids = torch.cat([_text_ids(1, 2), torch.full((1, n_img), LLAVA_IMAGE_TOKEN), _text_ids(1, 4)], dim=1)
    labels = ids.masked_fill(ids == LLAVA_IMAGE_TOKEN, -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 16, 16),
            "labels": labels}


def _qwen_vl_inputs() -> dict:
    t, h, w = QWEN_GRID
    n_patches = t * h * w
    n_img = n_patches // QWEN_MERGE**2
    ids = torch.cat([_text_ids(1, 2), torch.tensor([[QWEN_VL_IDS["vision_start_token_id"]]]),
                     torch.full((1, n_img), QWEN_VL_IDS["image_token_id"]),
                     torch.tensor([[QWEN_VL_IDS["vision_end_token_id"]]]), _text_ids(1, 4)], dim=1)
    labels = ids.masked_fill(ids == QWEN_VL_IDS["image_token_id"], -100)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == QWEN_VL_IDS["image_token_id"]).int(),
        "pixel_values": torch.randn(n_patches, 3 * QWEN_TPATCH * QWEN_PATCH * QWEN_PATCH),
        "image_grid_thw": torch.tensor([QWEN_GRID]),
        "labels": labels,
    }


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    count: int  # number of Linear/Conv1D layers the defaults must replace
    towers: tuple[str, ...] = ()  # name prefixes that must each contain at least one InherLinear
    extra: tuple[str, ...] = ()  # regexes of expected targets outside the transformer blocks
    routers: tuple[str, ...] = ()  # regexes of Linear layers inside the blocks that route tokens (stay dense)
    dense: tuple[str, ...] = ()  # modules that must stay exactly torch.nn.Linear


CASES: dict[str, Case] = {
    "bert": Case(lambda: T.BertForMaskedLM(T.BertConfig(**_BERT_TEXT)), _lm_inputs, 12,
                 dense=("cls.predictions.transform.dense", "cls.predictions.decoder")),
    "roberta": Case(lambda: T.RobertaForMaskedLM(T.RobertaConfig(**_BERT_TEXT)), _lm_inputs, 12,
                    dense=("lm_head.dense", "lm_head.decoder")),
    "xlm-roberta": Case(lambda: T.XLMRobertaForMaskedLM(T.XLMRobertaConfig(**_BERT_TEXT)), _lm_inputs, 12,
                        dense=("lm_head.dense", "lm_head.decoder")),
    "electra": Case(lambda: T.ElectraForMaskedLM(T.ElectraConfig(embedding_size=HIDDEN, **_BERT_TEXT)),
                    _lm_inputs, 12, dense=("generator_predictions.dense", "generator_lm_head")),
    "vit": Case(lambda: T.ViTForImageClassification(T.ViTConfig(num_labels=3, **_CLIP_VISION)), _vit_inputs, 12,
                dense=("classifier",)),
    "distilbert": Case(lambda: T.DistilBertForMaskedLM(T.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=INTER, max_position_embeddings=64)),
        _lm_inputs, 12, dense=("vocab_transform", "vocab_projector")),
    "gpt2": Case(lambda: T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)),
        _lm_inputs, 8, dense=("lm_head",)),
    "opt": Case(lambda: T.OPTForCausalLM(T.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, ffn_dim=INTER,
        max_position_embeddings=64, word_embed_proj_dim=HIDDEN)), _lm_inputs, 12, dense=("lm_head",)),
    "llama": Case(lambda: T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA_TEXT)), _lm_inputs, 14, dense=("lm_head",)),
    "mistral": Case(lambda: T.MistralForCausalLM(T.MistralConfig(**_LLAMA_TEXT)), _lm_inputs, 14,
                    dense=("lm_head",)),
    "qwen2": Case(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_LLAMA_TEXT)), _lm_inputs, 14, dense=("lm_head",)),
    "qwen3": Case(lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **_LLAMA_TEXT)), _lm_inputs, 14,
                  dense=("lm_head",)),
    "gemma": Case(lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=16, **_LLAMA_TEXT)), _lm_inputs, 14,
                  dense=("lm_head",)),
    "gemma2": Case(lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=16, **_LLAMA_TEXT)), _lm_inputs, 14,
                   dense=("lm_head",)),
    "phi3": Case(lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                        **_LLAMA_TEXT)), _lm_inputs, 8, dense=("lm_head",)),
    "t5": Case(lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=INTER, num_layers=2, num_heads=2,
        decoder_start_token_id=0)), _t5_inputs, 2 * 6 + 2 * 10, towers=("encoder.", "decoder."),
        dense=("lm_head",)),
    "clip": Case(lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(_CLIP_TEXT, projection_dim=16), vision_config=dict(_CLIP_VISION, projection_dim=16),
        projection_dim=16)), _dual_inputs, 24, towers=("text_model.", "vision_model."),
        dense=("visual_projection", "text_projection")),
    # SigLIP's attention-pooling head (`vision_model.head`: an nn.MultiheadAttention and an MLP) is a head, outside
    # the blocks: it stays dense, as the text `head`.
    "siglip": Case(lambda: T.SiglipModel(T.SiglipConfig(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION)),
                   _dual_inputs, 24, towers=("text_model.", "vision_model."),
                   dense=("text_model.head", "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2")),
    # Mixture of experts: transformers 5 stores the experts as fused 3-D parameters (not Linear) behind a router
    # module; the attention projections and Qwen2-MoE's shared expert are inherited, its `shared_expert_gate`
    # (a Linear router, hidden -> 1) stays dense. Eager experts: grouped_mm has no float64 kernel.
    "mixtral": Case(lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                 experts_implementation="eager", **_LLAMA_TEXT)), _lm_inputs, 2 * 4,
                    dense=("lm_head",)),
    "qwen2_moe": Case(lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=INTER,
        experts_implementation="eager", **_LLAMA_TEXT)), _lm_inputs, 2 * (4 + 3), routers=(r".*shared_expert_gate",),
        dense=("lm_head", "model.layers.0.mlp.shared_expert_gate")),
    "bart": Case(lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=INTER, decoder_ffn_dim=INTER, max_position_embeddings=64)),
        _seq2seq_inputs, 2 * 6 + 2 * 10, towers=("model.encoder.", "model.decoder."), dense=("lm_head",)),
    "whisper": Case(lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=INTER, decoder_ffn_dim=INTER, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)), _whisper_inputs, 2 * 6 + 2 * 10, towers=("model.encoder.", "model.decoder."),
        dense=("proj_out",)),
    "gpt_neox": Case(lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_BERT_TEXT)), _lm_inputs, 8,
                     dense=("lm_head",)),
    "bloom": Case(lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2,
                                                           n_head=2)), _lm_inputs, 8, dense=("lm_head",)),
    "falcon": Case(lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                              num_hidden_layers=2, num_attention_heads=2)),
                   _lm_inputs, 8, dense=("lm_head",)),
    "gptj": Case(lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2,
                                                        rotary_dim=8, n_positions=64)), _lm_inputs, 12,
                 dense=("lm_head",)),
    "phi": Case(lambda: T.PhiForCausalLM(T.PhiConfig(**_BERT_TEXT)), _lm_inputs, 12, dense=("lm_head",)),
    "starcoder2": Case(lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**_LLAMA_TEXT)), _lm_inputs, 12,
                       dense=("lm_head",)),
    "gemma3_text": Case(lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **_LLAMA_TEXT)), _lm_inputs,
                        14, dense=("lm_head",)),
    "deberta-v2": Case(lambda: T.DebertaV2ForMaskedLM(T.DebertaV2Config(**_BERT_TEXT)), _lm_inputs, 12),
    # ALBERT shares one layer group across all hidden layers: its 6 projections are inherited once.
    "albert": Case(lambda: T.AlbertForMaskedLM(T.AlbertConfig(embedding_size=16, **_BERT_TEXT)), _lm_inputs, 6,
                   extra=(r"albert\.encoder\.albert_layer_groups\.0\..*",),
                   dense=("albert.encoder.embedding_hidden_mapping_in", "predictions.dense", "predictions.decoder")),
    "deit": Case(lambda: T.DeiTForImageClassification(T.DeiTConfig(num_labels=3, **_CLIP_VISION)), _vit_inputs, 12,
                 dense=("classifier",)),
    # Swin: the stages are the blocks (each a list of attention blocks and the patch-merging `downsample`).
    "swin": Case(lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3)),
        _vit_inputs, 6 + 1 + 6, dense=("classifier",)),
    # vision_feature_layer=-1: with the default -2 the last vision layer's output is unused, so its
    # projections (correctly) get no gradient at all.
    "llava": Case(lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
        text_config=T.LlamaConfig(**_LLAMA_TEXT), vision_config=T.CLIPVisionConfig(**_CLIP_VISION),
        image_token_index=LLAVA_IMAGE_TOKEN, vision_feature_layer=-1)), _llava_inputs, 12 + 14,
        towers=("model.vision_tower.", "model.language_model."),
        dense=("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head")),
    "qwen2_vl": Case(lambda: T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
        text_config=_QWEN_VL_TEXT,
        vision_config=dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2,
                           patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TPATCH,
                           in_chans=3),
        **QWEN_VL_IDS)), _qwen_vl_inputs, 2 * 4 + 14, towers=("model.visual.", "model.language_model."),
        dense=("model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head")),
    "qwen2_5_vl": Case(lambda: T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=_QWEN_VL_TEXT,
        vision_config=dict(depth=2, hidden_size=HIDDEN, out_hidden_size=HIDDEN, num_heads=2,
                           intermediate_size=INTER, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                           temporal_patch_size=QWEN_TPATCH, in_channels=3, window_size=16,
                           fullatt_block_indexes=[1]),
        **QWEN_VL_IDS)), _qwen_vl_inputs, 2 * 5 + 14, towers=("model.visual.", "model.language_model."),
        dense=("model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head")),
}


def _dense_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Plain Linear / Conv1D layers, and Falcon's FalconLinear (an nn.Linear adding its bias after the matmul)."""
    return {n: m for n, m in model.named_modules()
            if type(m) in (nn.Linear, Conv1D, T.models.falcon.modeling_falcon.FalconLinear)}


def _expected_targets(case: Case, linears: dict[str, nn.Module]) -> set[str]:
    """Independent of the library's matcher: every Linear inside a transformer block, plus the case's extras, minus
    its routers."""
    return {n for n in linears if (BLOCK_RE.search(n) or any(re.fullmatch(p, n) for p in case.extra))
            and not any(re.fullmatch(p, n) for p in case.routers)}


def _loss(outputs) -> torch.Tensor:
    if getattr(outputs, "loss", None) is not None:
        return outputs.loss
    return outputs.logits.float().pow(2).mean()


def _inher_layers(model: nn.Module) -> dict[str, InherLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, InherLinear)}


def _build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[model_type].build()
    assert model.config.model_type == model_type
    return model


def test_at_least_25_model_types():
    assert len(CASES) >= 25


def _inherit(model_type: str):
    """(inherited model, its dense Linear/Conv1D layers before inheritance, the expected target names)."""
    case = CASES[model_type]
    model = _build(model_type)
    linears = _dense_linears(model)
    expected = _expected_targets(case, linears)
    inher = get_inher_model(model, InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)
    assert inher is model
    return inher, linears, expected




@pytest.mark.parametrize("model_type", list(CASES))
def test_default_targets(model_type):
    case = CASES[model_type]
    dense_model = _build(model_type)
    linears = _dense_linears(dense_model)
    expected = _expected_targets(case, linears)
    # the library's own matcher takes exactly the block projections (and the declared extras)
    by_default = {n for n in linears if matches(resolve_target_spec(dense_model, None), n)}
    assert len(expected) == case.count, sorted(expected)
    assert by_default == expected, (sorted(by_default - expected), sorted(expected - by_default))
    for name in case.dense:
        assert name in linears, f"{name} is not a Linear of the tiny {model_type} model"

    inher, linears, expected = _inherit(model_type)
    base = inher
    layers = _inher_layers(base)
    # 1. exactly the default-target projections became InherLinear, of the same shape, all inherited
    assert set(layers) == expected
    assert len(layers) == case.count
    for name, layer in layers.items():
        dense = linears[name]
        out_f, in_f = (dense.weight.T if isinstance(dense, Conv1D) else dense.weight).shape
        assert (layer.out_features, layer.in_features) == (out_f, in_f), name
    rows = inher.inher_report.rows
    assert {r.name for r in rows} == expected
    assert all(r.rank is not None for r in rows), [r.name for r in rows if r.rank is None]
    for tower in case.towers:
        assert any(n.startswith(tower) for n in layers), f"no InherLinear in tower {tower!r}"

    # 3. every other Linear (lm_head, projectors, pooling/classifier heads) is untouched
    modules = dict(base.named_modules())
    for name, dense in linears.items():
        if name not in expected:
            assert modules[name] is dense, name
    for name in case.dense:
        assert type(modules[name]) is nn.Linear, name


def _output(outputs) -> torch.Tensor:
    """The model's prediction: logits (CLIP/SigLIP: image-text logits), else its first tensor output."""
    for key in ("logits", "logits_per_image"):
        if getattr(outputs, key, None) is not None:
            return getattr(outputs, key)
    return outputs[0]


@pytest.mark.parametrize("model_type", list(CASES))
def test_inferred_defaults_start_at_the_rank_r_model(model_type):
    """Whole-model exact init in float64: the inherited model's output equals the dense model's with each inferred
    target's weight replaced by U_r S_r V_r^T (its bias kept)."""
    model = _build(model_type).double().eval()
    reference = copy.deepcopy(model)
    inher = get_inher_model(model, InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)
    rows = inher.inher_report.rows
    assert rows and all(r.inherited for r in rows)
    torch.manual_seed(1)
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in CASES[model_type].inputs().items()}
    with torch.no_grad():
        for row in rows:
            dense = reference.get_submodule(row.name)
            w_r = rank_r_reference(dense_weight(dense), row.rank)
            dense.weight.copy_(w_r.T if isinstance(dense, Conv1D) else w_r)
        expected = _output(reference(**inputs))
        assert rel_err(_output(inher(**inputs)), expected) < 1e-9


def test_an_architecture_nobody_listed_gets_its_block_projections(caplog):
    """A model type transformers has never heard of: its repeated blocks' Linear layers are the defaults, the
    embedding-side projection, the head and the router stay dense, and the choice is logged."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.router, self.out = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 8)

    class Novel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PreTrainedConfig()
            self.config.model_type = "novel_arch"
            self.embed_proj = nn.Linear(4, 8)
            self.stack = nn.ModuleList(Block() for _ in range(3))
            self.head = nn.Linear(8, 5)

    model = Novel()
    with caplog.at_level(logging.INFO, logger="inhernet_hf.targets"):
        spec = resolve_target_spec(model, None)
    assert f"inferred from the repeated blocks of this novel_arch model: {spec}" in caplog.text
    chosen = [n for n, _ in model.named_modules() if matches(spec, n)]
    assert chosen == [f"stack.{i}.{p}" for i in range(3) for p in ("mix", "out")]


@pytest.mark.parametrize("model_type", list(CASES))
def test_forward_backward_reaches_every_inher_parameter(model_type):
    inher, _, _ = _inherit(model_type)
    layers = _inher_layers(inher)
    params = {f"{ln}.{pn}": p for ln, layer in layers.items() for pn, p in layer.named_parameters()}
    kinds = {pn for layer in layers.values() for pn, _ in layer.named_parameters()}
    assert kinds >= {"inher_down.weight", "inher_up.weight", "inher_gate.weight", "inher_gate.bias"}, kinds
    for name, layer in layers.items():
        assert layer.inher_gate is not None, name

    torch.manual_seed(1)
    inputs = CASES[model_type].inputs()
    inher.train()

    def backward() -> dict[str, torch.Tensor]:
        inher.zero_grad(set_to_none=True)
        loss = _loss(inher(**inputs))
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        missing = [k for k, p in params.items() if p.grad is None]
        assert not missing, missing
        return {k: p.grad.detach().clone() for k, p in params.items()}

    grads = backward()
    zero = [k for k, g in grads.items() if not g.any() and ".inher_gate." not in k]
    assert not zero, zero

    # At the SVD init every head is the same copy of U S^1/2, so the output does not depend on the gate and
    # the gate's gradient is zero up to rounding (~1e-10, sometimes exactly 0). Make the heads differ (as the
    # first training steps do, since each head's gradient is weighted by its gate value) and the gate must
    # receive a real gradient, far above that rounding floor.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            up = layer.inher_up.weight
            up.add_(0.1 * up.std() * torch.randn(up.shape, generator=gen, dtype=up.dtype))
    grads_apart = backward()
    zero = [k for k, g in grads_apart.items() if not g.any()]
    assert not zero, zero
    for key in (k for k in params if ".inher_gate." in k):
        floor = grads[key].abs().max()
        assert grads_apart[key].abs().max() > 10 * floor, (key, float(floor), float(grads_apart[key].abs().max()))


@pytest.mark.parametrize("model_type", list(CASES))
def test_save_and_reload_with_both_loaders(model_type, tmp_path):
    """transformers saves some models (LLaVA, Qwen2-VL, ViT) under a legacy key layout and renames on load; the
    checkpoint check must follow that renaming, and modelling code that initialises `.bias` (SigLIP) must leave
    the loaded head biases alone. Both loaders give back every tensor exactly, and the same outputs."""
    inher, _, _ = _inherit(model_type)
    with torch.no_grad():  # weights away from the SVD init, so a re-initialised tensor cannot go unnoticed
        for layer in _inher_layers(inher).values():
            for param in layer.parameters():
                param.add_(torch.randn_like(param))
    inher.save_pretrained(tmp_path)
    expected = inher.state_dict()
    inputs = CASES[model_type].inputs()
    with torch.no_grad():
        reference = _loss(inher.eval()(**inputs))
    transformers_class = type(inher).__bases__[1]  # the model's own class, under the InherModel mixin
    for loaded in (InherModel.from_pretrained(tmp_path), transformers_class.from_pretrained(tmp_path)):
        assert isinstance(loaded, InherModel) and isinstance(loaded, transformers_class)
        state = loaded.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[k], v) for k, v in expected.items()), model_type
        with torch.no_grad():
            assert torch.equal(_loss(loaded.eval()(**inputs)), reference)


def test_unknown_model_type_needs_target_modules():
    class UnknownConfig(T.PreTrainedConfig):
        model_type = "not_a_known_model_type"

    class Unknown(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = UnknownConfig()
            self.proj = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="no list of repeated blocks holding Linear/Conv1D layers. Pass `target_modules`"):
        get_inher_model(Unknown(), InherConfig(target_ratio=0.5, num_heads=2), progressbar=False)


def test_all_linear_llava_keeps_projector_and_lm_head_dense():
    model = _build("llava")
    linears = _dense_linears(model)
    inher = get_inher_model(model, InherConfig(target_ratio=0.5, num_heads=2, target_modules="all-linear"),
                            progressbar=False)
    base = inher
    for name in ("lm_head", "model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"):
        assert type(base.get_submodule(name)) is nn.Linear, name
    layers = _inher_layers(base)
    # all-linear takes every other Linear: here exactly the block projections of both towers
    assert set(layers) == _expected_targets(CASES["llava"], linears)
    assert any(n.startswith("model.vision_tower.") for n in layers)
    assert any(n.startswith("model.language_model.") for n in layers)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_all_linear_keeps_every_layer_of_a_classification_head_dense(task_type):
    """RoBERTa's head is a module with its own Linear layers (classifier.dense, classifier.out_proj)."""
    model = T.RobertaForSequenceClassification(T.RobertaConfig(**_BERT_TEXT, num_labels=3))
    linears = _dense_linears(model)
    inher = get_inher_model(model, InherConfig(r=4, num_heads=2, target_modules="all-linear", task_type=task_type),
                            progressbar=False)
    layers = _inher_layers(inher)
    assert {"classifier.dense", "classifier.out_proj"} <= set(linears)
    assert set(layers) == {n for n in linears if not n.startswith("classifier.")}
