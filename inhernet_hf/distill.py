"""Every distillation loss of the recipes. Each `*Loss` class is a `train` loss function,
`loss_fn(model, batch) -> (loss, logs)`, with the frozen teacher inside.

`DistillationLoss`: the model's own loss mixed with Hinton KD (`kd_kl_loss`; `kd_mse_loss` for regression;
token-level on the answer tokens of a causal LM), plus an optional layer-wise `hidden_state_loss`.

`ContrastiveLoss`: CLIP's (softmax) or SigLIP's (sigmoid) image-text loss, with pairs of identical captions counted
as positives, optionally mixed with KD from the teacher's similarity matrix (CLIP-KD style).

The seed papers' feature-level baselines for a student classifier: HKT and HCD; HCD's training-only branches are
an `nn.Module` (`loss_fn.branches`) that the recipe trains with the student and never saves with it.

Features (for sequence and image classifiers):
* penultimate feature: the input of the classification head (`classifier` or `score`), captured by a hook, (B, C)
  (a CNN's pooled (B, C, 1, 1) map is flattened; heads applied to a whole sequence are refused, see
  `capture_head_input`);
* stage feature: the hidden state after a group of layers, mask-averaged over the sequence (B, C), or after a CNN
  stage, averaged over the positions (B, C_s).

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
accelerator's `autocast`), as `DistillationLoss` runs its teacher.
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
        if feature.ndim > 2 and all(size == 1 for size in feature.shape[2:]):  # a CNN's pooled (B, C, 1, 1) map
            feature = feature.flatten(1)
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


def pool_feature(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A stage's feature: (B, L, C) -> masked mean over L; (B, C, H, W) -> mean over the positions; both (B, C)."""
    return hidden.mean((2, 3)) if hidden.ndim == 4 else masked_mean_pool(hidden, attention_mask)


def stage_ends(num_layers: int, num_stages: int) -> list[int]:
    """Indices into `hidden_states` (0 = embeddings) ending `num_stages` equal groups of `num_layers` layers."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must lie in [1, {num_layers}] (the student's layers), got {num_stages}.")
    return [round(num_layers * (i + 1) / num_stages) for i in range(num_stages)]


def feature_width(config) -> int:
    """Width of a model's penultimate feature: `hidden_size`, or a CNN's last stage width (`hidden_sizes[-1]`)."""
    return config.hidden_size if getattr(config, "hidden_size", None) else config.hidden_sizes[-1]


def hcd_stages(config, num_stages: Optional[int] = None) -> tuple[list[int], list[int]]:
    """(indices into `hidden_states`, their widths) of HCD's student stages. A transformer: `num_stages` (default
    min(3, layers)) equal groups of layers; a CNN with `depths`: its own stages (hidden_states[1:]), all of them."""
    depths = getattr(config, "depths", None)
    if depths and getattr(config, "hidden_sizes", None):
        if num_stages not in (None, len(depths)):
            raise ValueError(f"a CNN's HCD stages are its {len(depths)} stages: num_stages must be {len(depths)} or "
                             f"unset, got {num_stages}.")
        return list(range(1, len(depths) + 1)), list(config.hidden_sizes)
    num_layers = config.num_hidden_layers
    ends = stage_ends(num_layers, num_stages or min(3, num_layers))
    return ends, [config.hidden_size] * len(ends)


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
    """HCD's training-only modules: per stage s a projector P_s (C_s -> C_t) and a Complementary Feature Mapper
    (Linear(2 C_t, C_t) -> ReLU -> Linear(C_t, k K)); `stage_dims` lists the C_s."""

    def __init__(self, stage_dims: list[int], teacher_dim: int, num_labels: int, k: int = 4) -> None:
        super().__init__()
        self.k, self.num_labels = k, num_labels
        self.projectors = nn.ModuleList(nn.Linear(dim, teacher_dim) for dim in stage_dims)
        self.mappers = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * teacher_dim, teacher_dim), nn.ReLU(), nn.Linear(teacher_dim, k * num_labels))
            for _ in stage_dims)

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
    """`train` loss function for HCD: student stage features (hidden states at `hcd_stages`, pooled) and
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
        stages = [pool_feature(outputs.hidden_states[i], mask) for i in self.stage_indices]
        with self.autocast():
            sub_logits = self.branches(stages, parent["feature"])
        return hcd_loss(outputs.logits, teacher_logits, sub_logits, batch["labels"], self.lam, self.beta, self.theta,
                        self.temperature)


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.device, torch.bool).expand_as(values)
    count = mask.sum()
    return torch.where(mask, values, 0.0).sum() / count.clamp(min=1)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over the last (class / vocabulary) axis and averaged
    over every other position: rows of a (batch, classes) pair, or the tokens where `mask` is True of a
    (batch, length, vocab) pair. Computed in float32."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    return temperature**2 * _masked_mean(kl, mask)


def kd_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error between student and teacher outputs (regression), averaged where `mask` is True."""
    err = (student_logits.float() - teacher_logits.detach().float()) ** 2
    if mask is not None:
        mask = mask.to(err.device, torch.bool)
        while mask.ndim < err.ndim:
            mask = mask.unsqueeze(-1)
    return _masked_mean(err, mask)


def hidden_state_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layer-wise relative error of the hidden states: the mean over layers l of
    sum ||h_s^l - h_t^l||^2 / sum ||h_t^l||^2, the sums over the positions where `mask` (batch, length) is 1.

    Takes the models' `hidden_states` tuples (the embeddings, then one (batch, length, hidden) entry per layer, the
    last one after the final norm in models that have one, as Llama); the embeddings are skipped. Computed in
    float32."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"hidden-state distillation matches layers one to one, but the student has "
                         f"{len(student_hidden) - 1} layers and the teacher {len(teacher_hidden) - 1}.")
    keep = None if mask is None else mask.to(student_hidden[-1].device, torch.bool)
    errors = []
    for student, teacher in zip(student_hidden[1:], teacher_hidden[1:]):
        if student.shape != teacher.shape:
            raise ValueError(f"hidden-state distillation needs equal hidden-state shapes; the student's are "
                             f"{tuple(student.shape)}, the teacher's {tuple(teacher.shape)}.")
        teacher = teacher.detach().float()
        diff = (student.float() - teacher).pow(2).sum(-1)
        norm = teacher.pow(2).sum(-1)
        if keep is not None:
            diff, norm = diff[keep], norm[keep]
        errors.append(diff.sum() / norm.sum().clamp(min=torch.finfo(torch.float32).tiny))
    return torch.stack(errors).mean()


def check_hidden_states_match(student_config, teacher_config) -> None:
    """Raises ValueError unless the student can be distilled layer by layer from the teacher (`hidden_state_loss`):
    the same number of layers and the same hidden size."""
    student = (student_config.num_hidden_layers, student_config.hidden_size)
    teacher = (teacher_config.num_hidden_layers, teacher_config.hidden_size)
    if student != teacher:
        raise ValueError(f"--kd_hidden_weight matches hidden states layer by layer, so the student needs the "
                         f"teacher's (layers, hidden size) = {teacher}; it has {student}.")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor,
                      alpha: float, temperature: float = 1.0, kind: str = "kl",
                      mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - alpha) * hard_loss + alpha * soft, with soft = `kd_kl_loss` (kind 'kl', Hinton et al.) or `kd_mse_loss`
    (kind 'mse', regression; the temperature is unused). Returns (total, soft)."""
    if kind == "kl":
        soft = kd_kl_loss(student_logits, teacher_logits, temperature, mask)
    elif kind == "mse":
        soft = kd_mse_loss(student_logits, teacher_logits, mask)
    else:
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}.")
    return (1.0 - alpha) * hard_loss + alpha * soft, soft


class DistillationLoss:
    """Per-batch loss for `train`: the model's own loss (`outputs.loss`, computed from `batch['labels']`), mixed
    with a KD term against the frozen `teacher` when `alpha > 0`, plus `hidden_weight` times the layer-wise
    `hidden_state_loss` (on the tokens of `batch['attention_mask']`) when `hidden_weight > 0`. Either needs a
    teacher; with neither, the teacher is not used.

    `token_level=True` is for causal LMs: logits at position i predict token i+1, so the KD term compares
    `logits[:, :-1]` on the positions whose next-token label is not `ignore_index` (the answer tokens); only those
    rows are selected before the softmaxes, so no (batch, length, vocab) float32 copy is made.
    """

    def __init__(self, teacher: Optional[nn.Module] = None, alpha: float = 0.0, temperature: float = 1.0,
                 kind: str = "kl", token_level: bool = False, ignore_index: int = -100,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                 hidden_weight: float = 0.0) -> None:
        if kind not in ("kl", "mse"):
            raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}.")
        distils = alpha > 0 or hidden_weight > 0
        if distils and teacher is None:
            raise ValueError(f"alpha={alpha} / hidden_weight={hidden_weight} distil from a teacher, but none was "
                             f"given (pass the teacher, or alpha=0 and hidden_weight=0).")
        self.teacher = teacher if distils else None
        self.alpha, self.temperature, self.kind, self.hidden_weight = alpha, temperature, kind, hidden_weight
        self.token_level, self.ignore_index = token_level, ignore_index
        self.autocast = autocast or contextlib.nullcontext
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden_kwargs = {"output_hidden_states": True} if self.hidden_weight > 0 else {}
        outputs = model(**batch, **hidden_kwargs)
        hard = outputs.loss
        if hard is None:
            raise ValueError("The model returned no loss: the batch needs 'labels'.")
        if self.teacher is None:
            return hard, {}
        student_logits, student_hidden = outputs.logits, outputs.hidden_states if hidden_kwargs else None
        del outputs  # keep only what the terms need: no other output of either model outlives this call
        with torch.no_grad(), self.autocast():
            teacher = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}, **hidden_kwargs)
        teacher_logits, teacher_hidden = teacher.logits, teacher.hidden_states if hidden_kwargs else None
        del teacher
        loss, logs = hard, {"task_loss": hard.detach()}
        if self.alpha > 0:
            if self.token_level:  # only the answer positions' rows (n_answer, vocab) go through the softmaxes
                answer = batch["labels"][:, 1:] != self.ignore_index
                student_logits, teacher_logits = student_logits[:, :-1][answer], teacher_logits[:, :-1][answer]
            loss, soft = distillation_loss(student_logits, teacher_logits, hard, self.alpha, self.temperature,
                                           self.kind)
            logs["kd_loss"] = soft.detach()
        del student_logits, teacher_logits
        if self.hidden_weight > 0:
            hidden = hidden_state_loss(student_hidden, teacher_hidden, batch.get("attention_mask"))
            loss = loss + self.hidden_weight * hidden
            logs["hidden_loss"] = hidden.detach()
        return loss, logs



def contrastive_loss(logits_per_image: torch.Tensor, caption_ids: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Image-text loss of a (B images, B texts) logit matrix whose pair i is (image i, text i); `caption_ids` (B,)
    names each text, so every pair of identical captions is a positive (a dataset built from class names repeats
    them; with distinct captions this is the usual diagonal target).
    softmax (CLIP): the mean of the image->text and text->image cross-entropies against the positives, uniform;
    sigmoid (SigLIP): -sum_j log sigmoid(+-z_ij) over the texts (+ for positives), averaged over the images."""
    positive = caption_ids[:, None] == caption_ids[None, :]
    logits = logits_per_image.float()
    if sigmoid:
        return -F.logsigmoid(torch.where(positive, logits, -logits)).sum(-1).mean()
    targets = positive.float() / positive.sum(-1, keepdim=True)  # symmetric: the same targets both ways
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class ContrastiveLoss:
    """`train` loss function of an image-text model (CLIP, SigLIP): `contrastive_loss` of its `logits_per_image`
    (batch["labels"]: the caption ids), mixed with KD from a frozen `teacher`'s similarity matrix when `alpha` > 0:
    (1 - alpha) * contrastive + alpha * the mean of the image->text and text->image `kd_kl_loss` at `temperature`
    (each logit matrix with its own model's learned scale)."""

    def __init__(self, teacher: Optional[nn.Module] = None, alpha: float = 0.0, temperature: float = 1.0,
                 sigmoid: bool = False, autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None):
        if alpha > 0 and teacher is None:
            raise ValueError(f"alpha={alpha} distils from a teacher, but none was given.")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and alpha > 0 else None
        self.alpha, self.temperature, self.sigmoid = alpha, temperature, sigmoid
        self.autocast = autocast or contextlib.nullcontext

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits_per_image
        task = contrastive_loss(logits, batch["labels"], self.sigmoid)
        if self.teacher is None:
            return task, {"task_loss": task.detach()}
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(**inputs).logits_per_image.float()
        kd = (kd_kl_loss(logits.float(), teacher_logits, self.temperature)
              + kd_kl_loss(logits.float().t(), teacher_logits.t(), self.temperature)) / 2
        return (1 - self.alpha) * task + self.alpha * kd, {"task_loss": task.detach(), "kd_loss": kd.detach()}


def student_loss(teacher: Optional[nn.Module], model: nn.Module, args, use_kd: bool, num_labels: int,
                 kind: str = "kl", autocast=None) -> tuple[Callable, Optional[HCDBranches]]:
    """(loss_fn, HCD branches or None) of a recipe run from its --distill_method / --kd_* / --hkt_* / --hcd_*
    flags. The branches are training-only: the recipe optimises them with the model (and prepares them, then sets
    `loss_fn.branches` to the prepared module) and never saves them."""
    if use_kd and args.distill_method == "hcd":
        stages, dims = hcd_stages(model.config, args.hcd_num_stages)
        branches = HCDBranches(dims, feature_width(teacher.config), num_labels, args.hcd_k)
        return HCDLoss(teacher, branches, stages, args.hcd_lambda, args.hcd_beta, args.hcd_theta,
                       args.kd_temperature, autocast=autocast), branches
    if use_kd and args.distill_method == "hkt":
        if feature_width(teacher.config) != feature_width(model.config):
            raise ValueError(f"--distill_method hkt mixes the student's and the teacher's penultimate features, so "
                             f"both need one width, but the teacher's is {feature_width(teacher.config)} and the "
                             f"student's {feature_width(model.config)}. For a teacher of another width use "
                             f"--distill_method hcd (its projectors map between widths).")
        return HKTLoss(teacher, args.hkt_lambda, autocast=autocast), None
    return DistillationLoss(teacher, args.kd_alpha if use_kd else 0.0, args.kd_temperature, kind=kind,
                            autocast=autocast, hidden_weight=args.kd_hidden_weight if use_kd else 0.0), None
