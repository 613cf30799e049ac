"""Feature-level distillation baselines for a student classifier: HKT and HCD (the seed papers' baselines; Hinton
KD is `training.DistillationLoss`). Each is a `train` loss function, `loss_fn(model, batch) -> (loss, logs)`, with
the frozen teacher inside; HCD's training-only branches are an `nn.Module` (`loss_fn.branches`) that the recipe
trains with the student and never saves with it.

Features (for sequence classifiers):
* penultimate feature: the input of the classification head (`classifier` or `score`), captured by a hook, (B, C)
  (heads applied to a whole sequence are refused, see `capture_head_input`);
* stage feature: the mask-averaged hidden state after a group of layers, (B, C).

HKT (Hereditary Knowledge Transfer, arXiv 2508.09743), child q and parent p penultimate features:
    a = sigmoid(<q, p> / sqrt(C)),  GA = a p + (1 - a) q,  mix = q + lambda (p - GA)
    loss = CE(child_head(q)) + CE(child_head(mix)) + CE(parent_head(mix))   (parent frozen)
HCD (Heterogeneous Complementary Distillation, arXiv 2511.10942), per student stage s:
    sub = CFM_s([P_s f_s, f_t])  (B, k, K)   CFM = Linear(2C_t, C_t) -> ReLU -> Linear(C_t, k K)
    fused = sub + z_t
    loss = CE(z_s) + mean CE(fused) + lambda T^2 mean KL(softmax(fused / T) || softmax(z_s / T)) + beta L_orth
    L_orth = mean over samples and pairs i != j of ReLU(cos(sub_i, sub_j) - theta)^2, true class masked out.
    Defaults k = 4, lambda = 6, beta = 1, theta = 0.5 and T = 2 (the recipes' --kd_temperature default, which sets
    HCD's T there).

Under mixed precision the student's forward runs under autocast (Accelerate wraps it), but the loss functions call
the teacher and the heads or branches themselves: they run them under the `autocast` context they are given (the
accelerator's `autocast`), as `training.DistillationLoss` runs its teacher.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

HEAD_NAMES = ("classifier", "score")


def classification_head(model: nn.Module) -> nn.Module:
    """The module that maps the penultimate feature to the logits (`classifier` or `score`)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no classification head named one of {HEAD_NAMES}; HKT and HCD "
                     f"need a sequence classifier.")


@contextlib.contextmanager
def capture_head_input(model: nn.Module):
    """Within the block, `store['feature']` holds the (B, C) input of the classification head of the last forward.

    Only heads applied to one pooled feature per example (BERT's `classifier`) qualify: a head applied to the whole
    (B, L, C) sequence pools inside or after itself (RoBERTa's head takes position 0 and adds a layer; decoders'
    `score` takes the last non-padding token), so no single input of it is the feature its logits come from.
    """
    store: dict[str, torch.Tensor] = {}
    head = classification_head(model)

    def hook(module, args):
        feature = args[0]
        if feature.ndim != 2:
            raise ValueError(f"HKT and HCD need a classification head applied to a pooled (batch, hidden) feature, as "
                             f"BERT-family classifiers have; {type(model).__name__}'s {type(head).__name__} is applied "
                             f"to the {tuple(feature.shape)} sequence. Use Hinton KD for this model (the recipes' "
                             f"--distill_method kd).")
        store["feature"] = feature

    handle = head.register_forward_pre_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def masked_mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L, C) -> (B, C): the mean over the positions where `attention_mask` is 1."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def stage_ends(num_layers: int, num_stages: int) -> list[int]:
    """Indices into `hidden_states` (0 = embeddings) ending `num_stages` equal groups of `num_layers` layers."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must lie in [1, {num_layers}] (the student's layers), got {num_stages}.")
    return [round(num_layers * (i + 1) / num_stages) for i in range(num_stages)]


# ----------------------------------------------------------------------------------------------------------------
# HKT
# ----------------------------------------------------------------------------------------------------------------


def genetic_mixture(child: torch.Tensor, parent: torch.Tensor, lam: float) -> torch.Tensor:
    """HKT's Genetic Attention mixture: mix = q + lam (p - GA), GA = a p + (1 - a) q, a = sigmoid(<q, p>/sqrt(C))."""
    a = torch.sigmoid((child * parent).sum(-1, keepdim=True) / math.sqrt(child.shape[-1]))
    ga = a * parent + (1 - a) * child
    return child + lam * (parent - ga)


def hkt_loss(child_feature: torch.Tensor, parent_feature: torch.Tensor, child_head: Callable, parent_head: Callable,
             labels: torch.Tensor, lam: float = 0.6) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(child_head(q)) + CE(child_head(mix)) + CE(parent_head(mix)); the parent feature is a constant."""
    if child_feature.shape[-1] != parent_feature.shape[-1]:
        raise ValueError(f"HKT mixes the student's and the teacher's head inputs, so they need one width: got "
                         f"{child_feature.shape[-1]} and {parent_feature.shape[-1]}. For a teacher of another width "
                         f"use HCD.")
    mix = genetic_mixture(child_feature, parent_feature.detach(), lam)
    child_ce = F.cross_entropy(child_head(child_feature).float(), labels)
    mix_child_ce = F.cross_entropy(child_head(mix).float(), labels)
    mix_parent_ce = F.cross_entropy(parent_head(mix).float(), labels)
    return child_ce + mix_child_ce + mix_parent_ce, {"task_loss": child_ce.detach(),
                                                     "mix_child_ce": mix_child_ce.detach(),
                                                     "mix_parent_ce": mix_parent_ce.detach()}


class HKTLoss:
    """`train` loss function for HKT with a frozen `teacher` (parent); only the student (child) is trained. The
    teacher and both heads run under `autocast` (default: none)."""

    def __init__(self, teacher: nn.Module, lam: float = 0.6,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> None:
        self.teacher, self.lam = teacher.eval().requires_grad_(False), lam
        self.parent_head = classification_head(teacher)
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with capture_head_input(model) as child:
            model(**inputs)
        with torch.no_grad(), self.autocast(), capture_head_input(self.teacher) as parent:
            self.teacher(**inputs)
        with self.autocast():
            return hkt_loss(child["feature"], parent["feature"], classification_head(model), self.parent_head,
                            batch["labels"], self.lam)


# ----------------------------------------------------------------------------------------------------------------
# HCD
# ----------------------------------------------------------------------------------------------------------------


class HCDBranches(nn.Module):
    """HCD's training-only modules: per stage a projector P_s (C_s -> C_t) and a Complementary Feature Mapper
    (Linear(2 C_t, C_t) -> ReLU -> Linear(C_t, k K))."""

    def __init__(self, student_dim: int, teacher_dim: int, num_stages: int, num_labels: int, k: int = 4) -> None:
        super().__init__()
        self.k, self.num_labels = k, num_labels
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_stages))
        self.mappers = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * teacher_dim, teacher_dim), nn.ReLU(), nn.Linear(teacher_dim, k * num_labels))
            for _ in range(num_stages))

    def forward(self, stage_features: list[torch.Tensor], teacher_feature: torch.Tensor) -> torch.Tensor:
        """Stage features S x (B, C_s) and the teacher feature (B, C_t) -> sub-logits (S, B, k, K)."""
        subs = [mapper(torch.cat([projector(f), teacher_feature], dim=-1))
                for f, projector, mapper in zip(stage_features, self.projectors, self.mappers)]
        return torch.stack(subs).unflatten(-1, (self.k, self.num_labels))


def orthogonality_loss(sub_logits: torch.Tensor, labels: torch.Tensor, theta: float = 0.5) -> torch.Tensor:
    """(..., B, k, K) sub-logits: mean over samples (and leading dims) and ordered pairs i != j of
    ReLU(cos(sub_i, sub_j) - theta)^2, with the true class's logit masked out of every vector."""
    k, num_labels = sub_logits.shape[-2:]
    if k < 2:  # no pairs
        return sub_logits.new_zeros(())
    keep = 1.0 - F.one_hot(labels, num_labels).to(sub_logits.dtype).unsqueeze(-2)  # (B, 1, K)
    unit = F.normalize(sub_logits * keep, dim=-1)
    cos = unit @ unit.transpose(-1, -2)  # (..., B, k, k)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=cos.device)
    return F.relu(cos[..., off_diagonal] - theta).pow(2).mean()


def hcd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, sub_logits: torch.Tensor,
             labels: torch.Tensor, lam: float = 6.0, beta: float = 1.0, theta: float = 0.5,
             temperature: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HCD's objective from student logits (B, K), teacher logits (B, K) and sub-logits (S, B, k, K)."""
    fused = sub_logits.float() + teacher_logits.detach().float()[:, None, :]  # (S, B, k, K)
    ce = F.cross_entropy(student_logits.float(), labels)
    num_labels = fused.shape[-1]
    fused_ce = F.cross_entropy(fused.reshape(-1, num_labels), labels.repeat_interleave(fused.shape[-2]).repeat(
        fused.shape[0]))
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)[:, None, :].expand_as(fused)
    log_p_f = F.log_softmax(fused.detach() / temperature, dim=-1)
    kl = temperature**2 * F.kl_div(log_p_s, log_p_f, reduction="none", log_target=True).sum(-1).mean()
    orth = orthogonality_loss(sub_logits.float(), labels, theta)
    return ce + fused_ce + lam * kl + beta * orth, {"task_loss": ce.detach(), "fused_ce": fused_ce.detach(),
                                                    "kd_loss": kl.detach(), "orth_loss": orth.detach()}


class HCDLoss:
    """`train` loss function for HCD: student stage features (hidden states after `stage_ends`, mask-averaged) and
    the frozen teacher's penultimate feature and logits feed `branches` (an `HCDBranches`, trained alongside). The
    teacher and the branches run under `autocast` (default: none)."""

    def __init__(self, teacher: nn.Module, branches: nn.Module, stage_indices: list[int], lam: float = 6.0,
                 beta: float = 1.0, theta: float = 0.5, temperature: float = 2.0,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.branches, self.stage_indices = branches, stage_indices
        self.lam, self.beta, self.theta, self.temperature = lam, beta, theta, temperature
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = model(**inputs, output_hidden_states=True)
        with torch.no_grad(), self.autocast(), capture_head_input(self.teacher) as parent:
            teacher_logits = self.teacher(**inputs).logits
        mask = inputs.get("attention_mask")
        stages = [masked_mean_pool(outputs.hidden_states[i], mask) for i in self.stage_indices]
        with self.autocast():
            sub_logits = self.branches(stages, parent["feature"])
        return hcd_loss(outputs.logits, teacher_logits, sub_logits, batch["labels"], self.lam, self.beta, self.theta,
                        self.temperature)
