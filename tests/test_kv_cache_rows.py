"""KVCache's row operations (select, join, trim, grow) and the decoding step that uses them.

Oracles: layouts written out by hand (which source token each (row, column) of a joined cache must
hold, and the joined mask), a stamp that names every cached entry by (layer, cache, row, column) so
a misplaced entry cannot pass, and for the step, each prompt decoded alone by generate().
"""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.decoding import decode_step, prefill_batch
from vlmkit.generate import generate, new_row
from vlmkit.models.lm import CausalLM, KVCache, leading_padding
from vlmkit.models.qwen2_vl import MRopeCache
from vlmkit.sampling import GenerationConfig

CFG = LMConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
MLA = LMConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, kv_lora_rank=3,
               qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2)


def stamp(layer: int, cache: int, row: int, column: int) -> float:
    """The number stored at every channel of one cached key (values hold its negative)."""
    return 1000 * layer + 100 * cache + 10 * row + column + 1  # + 1: never 0, the padding's value


def stamped(cfg: LMConfig, number: int, rows: int, length: int, max_len: int | None = None,
            kind: type[KVCache] = KVCache) -> KVCache:
    """A cache of `rows` rows holding `length` positions, every entry stamped with its name."""
    cache = kind(cfg, rows, max_len or length)
    for layer in range(cfg.num_layers):
        for b in range(rows):
            for s in range(length):
                cache.keys[layer][b, :, s] = stamp(layer, number, b, s)
                cache.values[layer][b, :, s] = -stamp(layer, number, b, s)
    cache.advance(length)
    return cache


def assert_layout(cache: KVCache, layout: list[list[tuple[int, int, int] | None]]) -> None:
    """Every layer's keys/values at (row, column) hold the stamp of layout[row][column] = (cache, row, column)
    of the sources; None is padding, whose content does not matter (the mask hides it)."""
    assert cache.length == len(layout[0]) and cache.batch_size == len(layout)
    for layer in range(len(cache.keys)):
        for b, row in enumerate(layout):
            for s, src in enumerate(row):
                if src is not None:
                    assert bool((cache.keys[layer][b, :, s] == stamp(layer, *src)).all()), (layer, b, s)
                    assert bool((cache.values[layer][b, :, s] == -stamp(layer, *src)).all()), (layer, b, s)


@pytest.mark.parametrize("cfg", [CFG, MLA], ids=["attention", "latent"])
def test_join_right_aligns_rows_and_cuts_unused_columns(cfg):
    a = stamped(cfg, 0, rows=2, length=4)  # cache 0: column 0 is padding in both rows
    a_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    b = stamped(cfg, 1, rows=1, length=2)  # cache 1: no padding
    b_mask = torch.tensor([[1, 1]])
    c = stamped(cfg, 2, rows=1, length=4)
    c_mask = torch.tensor([[0, 1, 1, 1]])
    mask = a.join(a_mask, [(b, b_mask), (c, c_mask)], room=5)
    # a keeps its columns 1..3 (column 0 is padding in both of its rows); width 3 = the widest part.
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert_layout(a, [[None, (0, 0, 2), (0, 0, 3)],
                      [(0, 1, 1), (0, 1, 2), (0, 1, 3)],
                      [None, (1, 0, 0), (1, 0, 1)],
                      [(2, 0, 1), (2, 0, 2), (2, 0, 3)]])
    assert (a.length, a.max_len) == (3, 8)
    if cfg is MLA:  # latent attention: keys (B, 1, S, r), values (B, 1, S, dr), r != dr
        assert a.keys[0].shape == (4, 1, 8, 3) and a.values[0].shape == (4, 1, 8, 2)


def test_join_checks_its_inputs():
    a, b = stamped(CFG, 0, 1, 2), stamped(CFG, 1, 1, 3)
    with pytest.raises(ValueError, match="mask"):
        a.join(torch.ones(1, 2, dtype=torch.long), [(b, torch.ones(1, 2, dtype=torch.long))])
    with pytest.raises(ValueError, match="one model"):
        a.join(torch.ones(1, 2, dtype=torch.long), [(stamped(MLA, 1, 1, 3), torch.ones(1, 3, dtype=torch.long))])


@pytest.mark.parametrize("cfg", [CFG, MLA], ids=["attention", "latent"])
def test_select_trim_grow(cfg):
    cache = stamped(cfg, 0, rows=3, length=4, max_len=6)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    cache.select(torch.tensor([2, 1]))  # drop row 0, swap the others
    mask = cache.trim(mask[torch.tensor([2, 1])])
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert_layout(cache, [[(0, 2, 1), (0, 2, 2), (0, 2, 3)], [(0, 1, 1), (0, 1, 2), (0, 1, 3)]])
    assert (cache.length, cache.max_len) == (3, 5)  # trimming frees no room: capacity shrinks as much
    assert cache.trim(mask).tolist() == mask.tolist() and cache.length == 3  # nothing more to cut
    cache.grow(4)
    assert (cache.length, cache.max_len) == (3, 9)
    assert_layout(cache, [[(0, 2, 1), (0, 2, 2), (0, 2, 3)], [(0, 1, 1), (0, 1, 2), (0, 1, 3)]])
    k = torch.full_like(cache.keys[0][:, :, :6], 7.0)  # (2, heads, 6, dim): fills the room exactly
    keys, _ = cache.update(0, k, torch.full_like(cache.values[0][:, :, :6], 7.0))
    assert keys.shape[2] == 9 and bool((keys[:, :, 3:] == 7).all())
    with pytest.raises(ValueError, match="n must be >= 1"):
        cache.grow(0)


def test_rope_deltas_follow_their_rows():
    lm = CFG
    a = stamped(lm, 0, rows=3, length=2, kind=MRopeCache)
    a.rope_deltas = torch.tensor([[-5], [0], [7]])
    a.select(torch.tensor([2, 0]))
    assert a.rope_deltas.tolist() == [[7], [-5]]
    b = stamped(lm, 1, rows=1, length=3, kind=MRopeCache)
    b.rope_deltas = torch.tensor([[-2]])
    mask = a.join(torch.ones(2, 2, dtype=torch.long), [(b, torch.ones(1, 3, dtype=torch.long))])
    assert a.rope_deltas.tolist() == [[7], [-5], [-2]]
    assert mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert_layout(a, [[None, (0, 2, 0), (0, 2, 1)], [None, (0, 0, 0), (0, 0, 1)], [(1, 0, 0), (1, 0, 1), (1, 0, 2)]])
    with pytest.raises(ValueError, match="one model"):  # a plain KVCache has no deltas to bring
        a.join(mask, [(stamped(lm, 2, 1, 1), torch.ones(1, 1, dtype=torch.long))])


def test_leading_padding():
    assert leading_padding(torch.tensor([[0, 0, 1], [0, 1, 1]])) == 1
    assert leading_padding(torch.tensor([[1, 1], [0, 1]])) == 0


def test_step_over_joined_prefills_equals_each_prompt_alone():
    """Prompts prefilled alone and joined (as the server's batcher does) decode as they would alone, with rows
    of other lengths, the longest one leaving early (so leading columns are trimmed), and a growing cache."""
    torch.manual_seed(0)
    model = CausalLM(LMConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    prompts = [[3, 9, 4, 1, 5, 9, 2, 6], [7, 1], [2, 7, 1, 8, 2]]
    configs = [GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=12),
               GenerationConfig(max_new_tokens=10, temperature=1.0, seed=4, repetition_penalty=1.2)]
    with torch.inference_mode():
        parts = [prefill_batch(model, [new_row(p, c)], len(p), {}, pad_id=0) for p, c in zip(prompts, configs)]
        first = parts[0]
        mask = first.cache.join(first.mask, [(p.cache, p.mask) for p in parts[1:]], room=2)
        batch = first
        batch.rows, batch.mask = [p.rows[0] for p in parts], mask
        batch.logits = torch.cat([p.logits for p in parts])  # (3, V)
        rows, widths = list(batch.rows), []
        while batch.rows:
            decode_step(model, batch, trim=True)
            widths.append(batch.mask.shape[1])
            if batch.rows and batch.cache.length == batch.cache.max_len:
                batch.cache.grow(2)
    for row, prompt, cfg in zip(rows, prompts, configs):
        assert row.ids == generate(model, [prompt], cfg).token_ids[0]
    # The 8-token prompt's row left at step 3, the 3 columns only it used with it: 10 -> 7, + 1 new.
    assert widths[:4] == [9, 10, 8, 9]
