"""vlmkit's own directory format, for models transformers has no class for.

config.json holds {"model_type": "vlmkit", "vlmkit_config": VLMConfig.to_dict()};
model.safetensors holds the module's own parameter names. Any VLMConfig
(e.g. a merge2x2 projector) round-trips exactly.
"""

from __future__ import annotations

from vlmkit.config import VLMConfig
from vlmkit.models.vlm import VLM
from vlmkit.weights.converter import Converter, StateDict

MODEL_TYPE = "vlmkit"


def config_from_hf(data: dict) -> VLMConfig:
    if "vlmkit_config" not in data:
        raise ValueError("a model_type 'vlmkit' config.json needs a 'vlmkit_config' entry")
    return VLMConfig.from_dict(data["vlmkit_config"])


def config_to_hf(cfg: VLMConfig) -> dict:
    return {"model_type": MODEL_TYPE, "vlmkit_config": cfg.to_dict()}


def state_from_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    state = dict(state)
    if cfg.lm.tie_word_embeddings:
        state["lm.lm_head.weight"] = state["lm.embed.weight"]
    return state


def state_to_hf(state: StateDict, cfg: VLMConfig) -> StateDict:
    if cfg.lm.tie_word_embeddings:
        return {k: v for k, v in state.items() if k != "lm.lm_head.weight"}
    return dict(state)


NATIVE = Converter(config_from_hf=config_from_hf, build=VLM, state_from_hf=state_from_hf,
                   config_to_hf=config_to_hf, state_to_hf=state_to_hf)
