"""Task-level token math (ORIGINAL §5 step 1, §10.2 step 4): query formatting with prefix/suffix, response
truncation at the truncate token, the validity filter and the penalty score; plus the per-update diagnostics of
the post-processed responses (penalty rate, length, distinct bigrams; not in the original)."""
from typing import Dict, Optional, Sequence, Union

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


def response_lengths(postprocessed: torch.Tensor, truncate_token: Optional[int], truncate_after: int) -> torch.Tensor:
    """Tokens of each post-processed response up to and including its first truncate token at index >=
    truncate_after (what `postprocess_responses` keeps); T where there is none, and always T without a
    truncate_token. (B, T) -> (B,) int64."""
    B, T = postprocessed.shape
    if truncate_token is None:
        return torch.full((B,), T, dtype=torch.long, device=postprocessed.device)
    if truncate_after < 0:
        raise ValueError(f"truncate_after must be >= 0, got {truncate_after}")
    matches = (postprocessed == truncate_token).long()
    matches[:, :truncate_after] = 0
    after_first = (torch.cumsum(matches, dim=1) - matches) > 0
    return T - after_first.long().sum(dim=1)


def distinct_ngrams(tokens: torch.Tensor, lengths: torch.Tensor, n: int = 2, n_groups: int = 1) -> torch.Tensor:
    """A repetition measure: the distinct n-grams over all n-grams of the rows' first `lengths` tokens (n-grams
    never cross rows), computed for each of `n_groups` equal blocks of rows (the virtual ranks of a process) and
    averaged over them. 1 means no n-gram repeats; a block without any n-gram (every row shorter than n) counts 1.
    tokens (B, T), lengths (B,) -> 0-d float32."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    B, T = tokens.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be ({B},), got {tuple(lengths.shape)}")
    if n_groups < 1 or B % n_groups:
        raise ValueError(f"{B} rows do not split into {n_groups} equal groups")
    device = tokens.device
    if T < n:
        return torch.ones((), dtype=torch.float32, device=device)
    windows = tokens.unfold(1, n, 1)  # (B, T - n + 1, n)
    inside = torch.arange(T - n + 1, device=device)[None, :] + n <= lengths.to(device)[:, None]  # (B, T - n + 1)
    group = torch.arange(B, device=device) // (B // n_groups)
    rows = torch.cat([group[:, None, None].expand(-1, T - n + 1, 1), windows.long()], dim=2)[inside]  # (N, 1 + n)
    total = torch.zeros(n_groups, dtype=torch.float32, device=device).index_add_(
        0, group, inside.sum(dim=1).float())
    distinct = torch.bincount(torch.unique(rows, dim=0)[:, 0], minlength=n_groups).float()
    ratio = torch.where(total > 0, distinct / total.clamp(min=1), torch.ones_like(total))
    return ratio.mean()


def response_diagnostics(postprocessed: torch.Tensor, truncate_token: Optional[int], truncate_after: int,
                         n_groups: int = 1) -> Dict[str, torch.Tensor]:
    """The per-update statistics of post-processed responses (B, T), each a 0-d float32 tensor:
    objective/penalty_rate (the fraction without a truncate token at index >= truncate_after, which get
    penalty_reward_value; 0 without a truncate_token), objective/response_length (mean `response_lengths`) and
    objective/distinct_2 (`distinct_ngrams` with n = 2 over the kept tokens, per group of rows, averaged)."""
    valid = responses_valid(postprocessed, truncate_token, truncate_after)
    lengths = response_lengths(postprocessed, truncate_token, truncate_after)
    return {"objective/penalty_rate": (~valid).float().mean(),
            "objective/response_length": lengths.float().mean(),
            "objective/distinct_2": distinct_ngrams(postprocessed, lengths, 2, n_groups)}
