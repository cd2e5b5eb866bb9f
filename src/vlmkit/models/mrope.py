"""Qwen2-VL's M-RoPE positions: a (t, h, w) triple per token, from the prompt and the grids of its images and videos.

After transformers' Qwen2VLModel.get_rope_index (models/qwen2_vl/modeling_qwen2_vl.py): a text
token has the same position on all three axes, counting on from the previous maximum + 1; an
image's merged tokens get (start, start + row, start + col) with start = that next free
position, and the text after it starts at start + max(rows, cols). A video's tokens get
(start + frame * interval, start + row, start + col) for each temporal patch `frame`, with
interval 1 in Qwen2-VL and tokens_per_second * second_per_grid_ts in Qwen2.5-VL (truncated to
an integer, as transformers does); the text after a video also starts at start + max(rows, cols)
(transformers 5's get_rope_index, even when the video's time ids run past it). Decoding continues
from the prefill's largest position: each row's `rope_deltas` (largest position + 1 - number of
real tokens) is kept, and a new token's position is its count of real tokens before it plus that
delta, as transformers' rope_deltas does (models/qwen2_vl.MRopeCache).
"""

from __future__ import annotations

import itertools

import torch


def grid_list(grid_thw: torch.Tensor | list) -> list[tuple[int, int, int]]:
    """image_grid_thw as a list of (t, h, w) ints, from an (I, 3) tensor or a list of triples."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else list(grid_thw)
    if not all(len(r) == 3 for r in rows):
        raise ValueError(f"image_grid_thw must be (num_images, 3) rows of (t, h, w), got {rows}")
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | list | None, image_token_id: int,
                    merge: int, attention_mask: torch.Tensor | None = None, *,
                    video_grid_thw: torch.Tensor | list | None = None, video_token_id: int | None = None,
                    video_intervals: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B, T) t/h/w positions and (B, 1) rope deltas for a prompt batch (transformers' get_rope_index).

    Each run of image_token_id takes the next image_grid_thw rows in order, each run of video_token_id the
    next video_grid_thw rows (several may follow each other directly; each takes t*h*w / merge^2 tokens).
    Video v's time ids step by video_intervals[v] (a scalar tensor; default 1) per temporal patch.
    Padding (attention_mask 0) gets position 0 and is skipped. delta = largest position + 1 - real tokens.
    The positions are worked out on the host (a python walk over each row's ids, many tiny tensors) and
    moved to input_ids' device in one copy at the end: on a GPU that beats a kernel launch per run.

        >>> pos, delta = mrope_positions(torch.tensor([[5, 9, 9, 9, 9, 6]]), [(1, 4, 4)], 9, 2)
        >>> pos[:, 0].tolist(), delta.tolist()
        ([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]], [[-2]])
        >>> pos, _ = mrope_positions(torch.tensor([[5, 8, 8, 6]]), None, 9, 2, video_grid_thw=[(2, 2, 2)],
        ...                          video_token_id=8)
        >>> pos[:, 0].tolist()  # two temporal patches of one token each: time 1, then 2
        [[0, 1, 2, 2], [0, 1, 1, 2], [0, 1, 1, 2]]
    """
    B, T = input_ids.shape
    grids = {"image": iter(grid_list(image_grid_thw) if image_grid_thw is not None else []),
             "video": iter(grid_list(video_grid_thw) if video_grid_thw is not None else [])}
    intervals = iter(video_intervals if video_intervals is not None else [])
    kind_of = {image_token_id: "image"} | ({video_token_id: "video"} if video_token_id is not None else {})
    positions = torch.zeros(3, B, T, dtype=torch.long)
    deltas = []
    for b in range(B):
        keep = attention_mask[b].bool().cpu() if attention_mask is not None else torch.ones(T, dtype=torch.bool)
        ids = input_ids[b].cpu()[keep].tolist()
        parts, start = [], 0
        for kind, run in itertools.groupby(ids, key=lambda i: kind_of.get(i, "text")):
            n = len(list(run))
            if kind == "text":
                parts.append(torch.arange(start, start + n).expand(3, -1))  # (3, n)
                start += n
                continue
            while n > 0:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"input_ids hold more {kind} placeholder runs than {kind}_grid_thw has rows; "
                                     f"pass one (t, h, w) row per {kind}")
                t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
                if t * gh * gw > n:
                    raise ValueError(f"a {kind} of grid {grid} needs {t * gh * gw} placeholder tokens but its run "
                                     f"has only {n}; build the prompt from the {kind}'s plan (num_tokens)")
                time = torch.arange(t)
                if kind == "video":
                    time = (time * next(intervals, torch.tensor(1))).long()  # (t,) as transformers truncates
                tt, hh, ww = torch.meshgrid(time, torch.arange(gh), torch.arange(gw), indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)  # (3, t*gh*gw)
                start += max(gh, gw)
                n -= t * gh * gw
        row = torch.cat(parts, dim=1)  # (3, real tokens)
        positions[:, b, keep] = row
        deltas.append(int(row.max()) + 1 - len(ids))
    for kind, rest in grids.items():
        if next(rest, None) is not None:
            raise ValueError(f"{kind}_grid_thw has more rows than input_ids have {kind}s; pass one row per {kind}")
    return positions.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)
