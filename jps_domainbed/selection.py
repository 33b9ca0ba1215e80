"""Joint parameter selection: choose a sparse mask from per-domain gradients.

The selection math works on plain flat tensors and does not depend on CLIP or
DomainBed. ``select_mask`` adds the part that touches a model. It computes one
source domain's gradient at a time and feeds it to ``JointSelector``. The
memory cost is therefore one domain's gradient plus statistics over the
entries that are still in the running, whatever the number of source domains.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mask import SparseMask

logger = logging.getLogger(__name__)

# The first linear layer of every transformer MLP in open_clip's ViT.
DEFAULT_CANDIDATE_PATTERNS = ("*.mlp.c_fc.weight",)

VARIANCE_MODES = ("plain", "normalized")


class NonFiniteGradientError(FloatingPointError):
    """A source domain's gradient contains NaN or infinite entries."""


@dataclass
class SelectionConfig:
    """Settings of joint parameter selection.

    k: number of weights to select (at most; fewer when fewer survive the
        importance operator).
    rho: fraction of candidate entries the importance operator keeps in each
        source domain, in (0, 1].
    candidate_patterns: fnmatch patterns on parameter names, relative to the
        backbone module, that name the candidate weights.
    variance: "plain" ranks survivors by the variance of their gradient
        across source domains; "normalized" divides that variance by the
        squared mean absolute gradient.
    selection_batches: minibatches per source domain used for the gradient.
    """

    k: int = 2000
    rho: float = 0.01
    candidate_patterns: Tuple[str, ...] = DEFAULT_CANDIDATE_PATTERNS
    variance: str = "plain"
    selection_batches: int = 8
    metadata: Dict[str, object] = field(default_factory=dict)

    def validate(self, num_candidates: Optional[int] = None) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if num_candidates is not None and self.k > num_candidates:
            raise ValueError(
                f"k={self.k} is larger than the {num_candidates} candidate "
                "weights; lower k or widen candidate_patterns")
        if not (isinstance(self.rho, (int, float)) and 0.0 < self.rho <= 1.0):
            raise ValueError(f"rho must be in (0, 1], got {self.rho!r}")
        if self.variance not in VARIANCE_MODES:
            raise ValueError(
                f"variance must be one of {VARIANCE_MODES}, got {self.variance!r}")
        if (isinstance(self.selection_batches, bool)
                or not isinstance(self.selection_batches, int)
                or self.selection_batches < 1):
            raise ValueError(
                "selection_batches must be a positive integer, got "
                f"{self.selection_batches!r}")
        if isinstance(self.candidate_patterns, str) or not self.candidate_patterns:
            raise ValueError(
                "candidate_patterns must be a non-empty sequence of fnmatch "
                f"patterns, got {self.candidate_patterns!r}")


def top_fraction_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Return a boolean mask of the ``n = max(1, round(rho * N))`` largest scores.

    Entries with a score of exactly zero are never kept, because a weight with
    no gradient is not important in that domain. Ties at the threshold go to
    the lower flat index, so the result is deterministic.
    """
    count = scores.numel()
    keep_count = min(count, max(1, int(math.floor(rho * count + 0.5))))
    if keep_count == count:
        return scores > 0

    # The keep_count-th largest score is the (count - keep_count + 1)-th smallest.
    threshold = torch.kthvalue(scores, count - keep_count + 1).values
    keep = scores > threshold
    ties = torch.nonzero(scores == threshold).flatten()
    keep[ties[: keep_count - int(keep.sum())]] = True
    return keep & (scores > 0)


def smallest_k(scores: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Return the ``k`` entries of ``index`` with the smallest scores, sorted.

    ``index`` must be sorted ascending; a stable sort then breaks ties by the
    lower flat index.
    """
    order = torch.sort(scores, stable=True).indices[:k]
    return torch.sort(index[order]).values


class JointSelector:
    """Streaming importance and variance operators over flat gradients.

    Feed one source domain's flat gradient ``G_d`` (shape ``(N,)``) at a time
    with ``add_domain``, then call ``select``.

    Importance operator: ``I_d = top_rho(|G_d|)``, the ``round(rho * N)``
    entries with the largest nonzero ``|G_d|``; the survivors are
    ``S = I_1 ∩ ... ∩ I_D``.

    Variance operator: among ``S``, keep the ``k`` entries with the smallest
    score, where with ``mean_i = (1/D) Σ_d G_d[i]``

    - plain:      ``score_i = (1/D) Σ_d (G_d[i] - mean_i)²``
    - normalized: ``score_i = plain_i / ((1/D) Σ_d |G_d[i]|)²``

    Plain variance is the default because it is the method's operator as
    stated: keep the weights whose gradient varies least across source
    domains. It prefers survivors whose gradients are smaller overall, a bias
    that the scale-free normalized score removes, so that score is offered
    for ablations.

    With a single source domain the variance is undefined (zero everywhere),
    so the survivors are ranked by ``|G_1|``, largest first, and a warning is
    logged. When fewer than ``k`` entries survive, all survivors are selected
    and a warning names the shortfall. Ties break by the lower flat index.

    Only entries still in ``S`` carry statistics (float64 running mean, sum
    of squared deviations and mean absolute value, Welford's update), so
    memory is bounded by one gradient plus ``O(rho * N)``.
    """

    def __init__(self, num_candidates: int, k: int, rho: float, variance: str = "plain"):
        SelectionConfig(k=k, rho=rho, variance=variance).validate(num_candidates)
        self.num_candidates = num_candidates
        self.k = k
        self.rho = rho
        self.variance = variance
        self.num_domains = 0
        self.survivors: Optional[torch.Tensor] = None
        self._mean: Optional[torch.Tensor] = None
        self._sum_sq_dev: Optional[torch.Tensor] = None
        self._mean_abs: Optional[torch.Tensor] = None
        self.survivor_counts: List[int] = []

    def add_domain(self, gradient: torch.Tensor, domain: str = "") -> None:
        """Apply the importance operator for one domain and update statistics."""
        gradient = gradient.detach().flatten()
        label = domain or f"#{self.num_domains}"
        if gradient.numel() != self.num_candidates:
            raise ValueError(
                f"gradient of source domain {label} has {gradient.numel()} "
                f"entries, expected {self.num_candidates}")
        check_finite(gradient, label)

        keep = top_fraction_mask(gradient.abs(), self.rho)
        if self.survivors is None:
            self.survivors = torch.nonzero(keep).flatten()
            values = gradient[self.survivors].double()
            self._mean = values
            self._sum_sq_dev = torch.zeros_like(values)
            self._mean_abs = values.abs()
        else:
            still = keep[self.survivors]
            self.survivors = self.survivors[still]
            self._mean = self._mean[still]
            self._sum_sq_dev = self._sum_sq_dev[still]
            self._mean_abs = self._mean_abs[still]
            values = gradient[self.survivors].double()
            count = self.num_domains + 1
            delta = values - self._mean
            self._mean = self._mean + delta / count
            self._sum_sq_dev = self._sum_sq_dev + delta * (values - self._mean)
            self._mean_abs = self._mean_abs + (values.abs() - self._mean_abs) / count

        self.num_domains += 1
        self.survivor_counts.append(int(self.survivors.numel()))
        logger.info("importance operator, source domain %s: %d of %d entries survive",
                    label, self.survivor_counts[-1], self.num_candidates)

    def scores(self) -> torch.Tensor:
        """Return the variance-operator score of each survivor (float64)."""
        if self.num_domains == 0:
            raise RuntimeError("JointSelector.scores needs at least one add_domain call")
        variance = self._sum_sq_dev / self.num_domains
        if self.variance == "normalized":
            return variance / self._mean_abs.square()
        return variance

    def select(self) -> torch.Tensor:
        """Return the sorted flat indices of the selected entries."""
        if self.num_domains == 0:
            raise RuntimeError("JointSelector.select needs at least one add_domain call")
        survivors = self.survivors
        if survivors.numel() < self.k:
            logger.warning(
                "only %d entries survive the importance operator, fewer than "
                "k=%d: selecting all of them; raise rho to select more",
                survivors.numel(), self.k)
            return survivors.clone()
        if self.num_domains == 1:
            logger.warning(
                "one source domain: the variance across domains is undefined, "
                "so the %d survivors are ranked by gradient magnitude alone",
                survivors.numel())
            return smallest_k(-self._mean_abs, survivors, self.k)
        return smallest_k(self.scores(), survivors, self.k)


def check_finite(gradient: torch.Tensor, domain: str) -> None:
    """Raise NonFiniteGradientError naming the domain if ``gradient`` has NaN or inf."""
    finite = torch.isfinite(gradient)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    raise NonFiniteGradientError(
        f"the gradient of source domain {domain} has {bad} NaN or infinite "
        "entries; check that domain's inputs and labels for NaN or infinite values, "
        "and the encoder weights if they were loaded from a file")


def importance_operator(gradients: Sequence[torch.Tensor], rho: float) -> torch.Tensor:
    """Return the boolean survivor mask ``I_1 ∩ ... ∩ I_D`` (see JointSelector)."""
    keep = None
    for domain, gradient in enumerate(gradients):
        check_finite(gradient.flatten(), f"#{domain}")
        domain_keep = top_fraction_mask(gradient.flatten().abs(), rho)
        keep = domain_keep if keep is None else keep & domain_keep
    if keep is None:
        raise ValueError("importance_operator needs at least one source domain gradient")
    return keep


def joint_selection(gradients: Sequence[torch.Tensor], k: int, rho: float,
                    variance: str = "plain") -> torch.Tensor:
    """Run both operators on in-memory gradients; return sorted flat indices."""
    if len(gradients) == 0:
        raise ValueError("joint_selection needs at least one source domain gradient")
    selector = JointSelector(gradients[0].numel(), k=k, rho=rho, variance=variance)
    for domain, gradient in enumerate(gradients):
        selector.add_domain(gradient, f"#{domain}")
    return selector.select()


def find_candidates(module: nn.Module, patterns: Sequence[str]) -> Dict[str, nn.Parameter]:
    """Return the parameters of ``module`` whose names match any pattern.

    Raises ValueError naming the pattern when a pattern matches nothing.
    """
    named = dict(module.named_parameters())
    candidates = {}
    for pattern in patterns:
        matched = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"candidate pattern {pattern!r} matches no parameter of "
                f"{type(module).__name__}; parameter names look like "
                f"{list(named)[:3]}")
        for name in matched:
            candidates[name] = named[name]
    # Keep the module's own order so flat indices follow the network's depth.
    return {name: named[name] for name in named if name in candidates}


def domain_gradient(forward: Callable[[torch.Tensor], torch.Tensor],
                    params: Sequence[torch.Tensor], batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                    domain: str, num_batches: int, progress=None,
                    names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Return the flat gradient of the mean cross-entropy over ``num_batches``.

    ``G_d = ∇_W (1/B) Σ_b CE(forward(x_b), y_b)`` with respect to ``params``,
    as one float32 vector (concatenated in order). Raises ValueError for an
    empty minibatch or a domain with fewer than ``num_batches`` minibatches,
    and NonFiniteGradientError naming the domain and the minibatch whose
    gradient has NaN or infinite entries.
    """
    sizes = [param.numel() for param in params]
    flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
    seen = 0
    for batch_index, (x, y) in enumerate(batches):
        if batch_index == num_batches:
            break
        if x.shape[0] == 0:
            raise ValueError(
                f"minibatch {batch_index} of source domain {domain} is empty; "
                "every selection minibatch needs at least one example")
        loss = F.cross_entropy(forward(x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for position, grad in enumerate(grads):
            if grad is not None and not bool(torch.isfinite(grad).all()):
                where = names[position] if names is not None else f"candidate tensor {position}"
                raise NonFiniteGradientError(
                    f"the gradient of source domain {domain}, minibatch {batch_index}, has NaN "
                    f"or infinite entries (first in {where}); check that "
                    "minibatch's inputs and labels for NaN or infinite values, and the "
                    "encoder weights if they were loaded from a file")
        offset = 0
        for grad, size in zip(grads, sizes):
            if grad is not None:
                flat[offset:offset + size] += grad.detach().reshape(-1).float()
            offset += size
        seen += 1
        if progress is not None:
            progress.update(1)
    if seen < num_batches:
        raise ValueError(
            f"source domain {domain} gave {seen} minibatches for selection, "
            f"but selection_batches={num_batches}; lower selection_batches or "
            "pass more data")
    return flat / num_batches


def select_mask(backbone: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
                domains: Sequence[Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                config: SelectionConfig = SelectionConfig(),
                domain_names: Optional[Sequence[str]] = None,
                show_progress: bool = True) -> SparseMask:
    """Select a mask of ``config.k`` backbone weights from source-domain data.

    ``domains`` has one iterable of ``(x, y)`` minibatches per source domain;
    the first ``config.selection_batches`` of each are used. The loss runs
    through ``head(backbone(x))`` with the head as it is now. No weight is
    changed. Mask names are relative to ``backbone``.

    Raises ValueError for settings out of range or empty minibatches, and
    NonFiniteGradientError naming the domain whose gradient has NaN or inf.
    """
    candidates = find_candidates(backbone, config.candidate_patterns)
    num_candidates = sum(param.numel() for param in candidates.values())
    config.validate(num_candidates)
    if len(domains) == 0:
        raise ValueError("select_mask needs at least one source domain")
    names = list(domain_names) if domain_names is not None else [str(i) for i in range(len(domains))]

    params = list(candidates.values())
    all_params = list(backbone.parameters())
    requires_grad = [param.requires_grad for param in all_params]
    was_training = backbone.training
    backbone.eval()
    selector = JointSelector(num_candidates, k=config.k, rho=config.rho, variance=config.variance)

    from tqdm.auto import tqdm
    progress = tqdm(total=len(domains) * config.selection_batches, desc="JPS selection",
                    unit="batch", disable=not show_progress)
    try:
        # Only the candidates need a gradient, so autograd skips the rest.
        for param in all_params:
            param.requires_grad_(False)
        for param in params:
            param.requires_grad_(True)
        for name, batches in zip(names, domains):
            gradient = domain_gradient(lambda x: head(backbone(x)), params, batches,
                                       name, config.selection_batches, progress,
                                       names=list(candidates))
            selector.add_domain(gradient, name)
            del gradient
    finally:
        progress.close()
        for param, flag in zip(all_params, requires_grad):
            param.requires_grad_(flag)
        backbone.train(was_training)

    flat_index = selector.select()
    mask = split_flat_index(flat_index, {name: tuple(p.shape) for name, p in candidates.items()})
    mask.metadata.update({
        "k": config.k, "rho": config.rho, "variance": config.variance,
        "selection_batches": config.selection_batches,
        "candidate_patterns": list(config.candidate_patterns),
        "num_source_domains": len(domains),
        "survivor_counts": list(selector.survivor_counts),
        **config.metadata,
    })
    log_mask_summary(mask)
    return mask


def split_flat_index(flat_index: torch.Tensor, shapes: Dict[str, Tuple[int, ...]]) -> SparseMask:
    """Turn indices into the concatenated candidates into a per-parameter mask."""
    flat_index = flat_index.cpu()
    indices = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        inside = (flat_index >= offset) & (flat_index < offset + size)
        indices[name] = flat_index[inside] - offset
        offset += size
    return SparseMask(indices=indices, shapes=dict(shapes))


def log_mask_summary(mask: SparseMask) -> None:
    """Log the number of selected weights per candidate parameter."""
    logger.info("JPS mask: %d of %d candidate weights selected",
                mask.num_selected, mask.num_candidates)
    for name, count in mask.counts().items():
        logger.info("  %-50s %6d", name, count)
