"""Joint Parameter Selection (JPS) for CLIP fine-tuning, usable as a DomainBed plugin.

Programmatic use, independent of DomainBed::

    from jps_domainbed import SelectionConfig, select_mask, apply_mask

    mask = select_mask(featurizer, head, per_domain_batches, SelectionConfig(k=2000, rho=0.01))
    optimizer = torch.optim.AdamW([*featurizer.parameters(), *head.parameters()], lr=5e-5)
    masked = apply_mask(featurizer, mask, optimizer)
    # ... ordinary training loop: loss.backward(); optimizer.step()
    save_masked_weights("jps_mask.pt", masked)
"""

from .mask import SparseMask
from .masked_training import (MaskedUpdate, apply_mask, load_masked_weights,
                              save_masked_weights, weights_hash)
from .selection import (DEFAULT_CANDIDATE_PATTERNS, JointSelector,
                        NonFiniteGradientError, SelectionConfig,
                        importance_operator, joint_selection, select_mask)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CANDIDATE_PATTERNS", "JointSelector", "MaskedUpdate",
    "NonFiniteGradientError", "SelectionConfig", "SparseMask", "apply_mask",
    "importance_operator", "joint_selection", "load_masked_weights",
    "save_masked_weights", "select_mask", "weights_hash",
]
