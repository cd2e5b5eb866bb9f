"""What the causal-LM parity tests against transformers (test_lm_parity.py, test_moe.py,
test_deepseek_v2_parity.py) share: left-padded random batches, the position ids transformers derives from
their mask, and the checks of logits (plain and left-padded batches), greedy tokens and a reload, each within
TOL and naming the case when it fails."""

from __future__ import annotations

import torch

from vlmkit.generate import generate
from vlmkit.sampling import GenerationConfig

TOL = 1e-4
NEW_TOKENS = 20


def padded_batch(lengths: list[int], seed: int, vocab: int, low: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random ids in low..vocab-1 (B, T), pad id 0, and the attention mask (1 = real token)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(low, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n:] = 1
        ids[row, :T - n] = 0
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids transformers' generate() derives from a left-padded mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def check_logits(hf, ours, case: str, vocab: int, lengths: tuple[int, ...]) -> None:
    """Random (2, T) ids for each T in lengths (seeded by T): logits within TOL of transformers'."""
    for length in lengths:
        ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(length))
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
        assert diff <= TOL, f"{case}, T={length}: max |logits diff| = {diff}"


@torch.no_grad()
def check_left_padded_logits(hf, ours, case: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """A left-padded batch: the real positions' logits within TOL of transformers' (given generate's positions)."""
    ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (ref[real] - got[real]).abs().max().item()
    assert diff <= TOL, f"{case}: padded batch max |logits diff| = {diff}"


@torch.no_grad()
def hf_greedy(hf, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' generate: NEW_TOKENS greedy tokens after ids (B, NEW_TOKENS), none cut short."""
    return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, pad_token_id=0)[:, ids.shape[1]:]


@torch.no_grad()
def check_greedy_generation(hf, ours, case: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """vlmkit.generate with its KV cache gives transformers' NEW_TOKENS greedy tokens on a left-padded batch."""
    got = generate(ours, ids, GenerationConfig(max_new_tokens=NEW_TOKENS), attention_mask=mask).token_ids
    assert got == hf_greedy(hf, ids, mask).tolist(), f"{case}: greedy tokens differ"


@torch.no_grad()
def check_reloaded_logits(back, hf, case: str, vocab: int, length: int) -> None:
    """back (transformers' load of vlmkit's save) gives hf's logits within TOL on random (2, length) ids."""
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(3))
    diff = (back(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL, f"{case}: logits after vlmkit save differ by {diff}"
