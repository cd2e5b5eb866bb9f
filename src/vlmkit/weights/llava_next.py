"""transformers `llava_next` (LLaVA-NeXT / LLaVA-1.6) checkpoints <-> vlmkit VLM with image_scheme="anyres".

A llava_next checkpoint is a llava checkpoint plus two things, so everything
else is the llava converter's:
    config.json   image_grid_pinpoints [[height, width], ...]     VLMConfig.grid_pinpoints
    tensors       image_newline (or model.image_newline), (C,)   VLM.image_newline
"""

from __future__ import annotations

import dataclasses

from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights import llava
from vlmkit.weights.converter import Converter, StateDict

# LlavaNextConfig's default pinpoints (llava-v1.6), used when config.json omits them.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_NEWLINE_KEYS = ("image_newline", "model.image_newline")


def config_from_hf(hf: dict) -> VLMConfig:
    pinpoints = tuple(tuple(p) for p in hf.get("image_grid_pinpoints", DEFAULT_PINPOINTS))
    return dataclasses.replace(llava.config_from_hf(hf), image_scheme="anyres", grid_pinpoints=pinpoints)


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    found = [k for k in _NEWLINE_KEYS if k in state]
    if len(found) != 1:
        raise ValueError(f"a llava_next checkpoint holds exactly one image_newline tensor "
                         f"(one of {_NEWLINE_KEYS}); found {found}")
    rest = {k: v for k, v in state.items() if k != found[0]}
    return {**llava.state_from_hf(rest, cfg), "image_newline": state[found[0]]}


def config_to_hf(cfg: VLMConfig) -> dict:
    if cfg.image_scheme != "anyres":
        raise ValueError(f"model_type llava_next needs image_scheme='anyres', this model uses {cfg.image_scheme!r}; "
                         "save it as model_type='llava'")
    hf = llava.config_to_hf(dataclasses.replace(cfg, image_scheme="pad", grid_pinpoints=()))
    hf.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
              image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints])
    return hf


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    rest = {k: v for k, v in state.items() if k != "image_newline"}
    return {**llava.state_to_hf(rest, cfg), "image_newline": state["image_newline"]}


LLAVA_NEXT = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf,
                       config_to_hf=config_to_hf, state_to_hf=state_to_hf,
                       natural=lambda cfg: cfg.image_scheme == "anyres" and cfg.projector.type == "mlp2x_gelu")
