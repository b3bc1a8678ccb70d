"""Task-level token math (ORIGINAL §5 step 1, §10.2 step 4): query formatting with prefix/suffix, response
truncation at the truncate token, the validity filter and the penalty score."""
from typing import Optional, Sequence, Union

import torch

Tokens = Union[Sequence[int], torch.Tensor]


def format_queries(queries: torch.Tensor, prefix_tokens: Tokens, suffix_tokens: Tokens) -> torch.Tensor:
    """The policy context: prefix + query + suffix, the affixes tiled over the batch; (B, Q) -> (B, P + Q + S)."""
    batch = queries.shape[0]
    prefix = torch.as_tensor(prefix_tokens, dtype=queries.dtype, device=queries.device).reshape(1, -1)
    suffix = torch.as_tensor(suffix_tokens, dtype=queries.dtype, device=queries.device).reshape(1, -1)
    return torch.cat([prefix.expand(batch, -1), queries, suffix.expand(batch, -1)], dim=1)


def postprocess_responses(responses: torch.Tensor, truncate_token: Optional[int], truncate_after: int,
                          padding_token: int) -> torch.Tensor:
    """Replace every token strictly after the first truncate_token at index >= truncate_after by padding_token.

    The truncate token itself is kept; without a truncate_token the responses are returned unchanged. (B, T) -> (B, T)
    """
    if truncate_token is None:
        return responses
    if truncate_after < 0:
        raise ValueError(f"truncate_after must be >= 0, got {truncate_after}")
    matches = (responses == truncate_token).long()
    matches[:, :truncate_after] = 0
    after_first = (torch.cumsum(matches, dim=1) - matches) > 0
    return torch.where(after_first, torch.full_like(responses, padding_token), responses)


def responses_valid(postprocessed: torch.Tensor, truncate_token: Optional[int], truncate_after: int) -> torch.Tensor:
    """True where the truncate token occurs at index >= truncate_after (always True without one); (B, T) -> (B,)."""
    if truncate_token is None:
        return torch.ones(postprocessed.shape[0], dtype=torch.bool, device=postprocessed.device)
    if truncate_after < 0:
        raise ValueError(f"truncate_after must be >= 0, got {truncate_after}")
    return (postprocessed[:, truncate_after:] == truncate_token).any(dim=-1)


def penalized_scores(raw_scores: torch.Tensor, valid: torch.Tensor, penalty_reward_value: float) -> torch.Tensor:
    """raw_scores where valid, else penalty_reward_value; (B,), (B,) -> (B,)."""
    if raw_scores.shape != valid.shape:
        raise ValueError(f"raw_scores {tuple(raw_scores.shape)} and valid {tuple(valid.shape)} must have one shape")
    return torch.where(valid, raw_scores, torch.full_like(raw_scores, penalty_reward_value))
