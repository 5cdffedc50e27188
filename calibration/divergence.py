"""Divergence math on next-token distributions: log-probabilities, KL(p_ref || p_q), entropy."""

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def kl_per_token(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    p = ref_lp.exp()  # where p == 0 the term is 0, not 0 * inf
    return torch.where(p > 0, p * (ref_lp - lp), 0.0).sum(-1)


def entropy(lp: torch.Tensor) -> torch.Tensor:
    p = lp.exp()
    return -torch.where(p > 0, p * lp, 0.0).sum(-1)
