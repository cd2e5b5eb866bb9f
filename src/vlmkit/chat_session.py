"""A multi-turn chat with a loaded model: history, attached images, streamed answers (no terminal I/O here).

    session = ChatSession(load_model("tiny-random"), GenerationConfig(max_new_tokens=64, seed=0))
    session.attach_image("examples/shapes.png")      # goes with the next user turn
    for piece in session.ask("What is in the picture?"):
        print(piece, end="", flush=True)
    for piece in session.ask("And its colours?"):    # the image is not encoded again
        print(piece, end="", flush=True)
    session.save("chat.json")                         # messages + image paths

Image features are computed once per conversation, for every model that takes images (an ImageModel:
vlmkit's VLM, Qwen2-VL / Qwen2.5-VL, DeepSeek-VL, the demo's DemoVLM), through the interface they share
(models/image_model.py):
- `encode_images(**image_inputs)` -> each image's (T_i, C) rows at the LM width (vision tower(s),
  projector or merger, layout), where image_inputs is what `LoadedModel.image_inputs` makes;
- `forward(input_ids, image_embeds=rows, **positions)`: the rows scattered into the placeholders
  instead of encoding pixels, positions being the image_inputs entries named by the class's
  `image_position_inputs` (Qwen2-VL's image_grid_thw, from which the M-RoPE positions come; none
  for the others).
An image is planned (its views and token count) and encoded the first time a turn that shows it is
prompted (`LoadedModel.encode` -> an EncodedImage: its rows and its own rows of the position
inputs); every later prompt's prefill is built from those (`LoadedModel.encoded_prefill`, which the
server's image-feature cache uses too), so the vision tower never sees the image again. `vision_calls` counts
encode_images calls. The text of the conversation is still prefilled in full each turn (the KV cache
lives inside one generate call), so positions are recomputed over the whole conversation exactly as
for a fresh prompt.

An image is planned with the other images of its own turn: for the one scheme whose plan depends
on the number of images in the prompt (tiles: tiling is off above 2), a fresh recomputation of a
conversation with images in several turns would plan them together and may differ.

Text-only models (e.g. SmolLM2) work the same way; attaching an image to one raises ValueError.
Videos are not part of a chat (`vlmkit generate --video` takes them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from vlmkit.generate import GenerationResult, stream
from vlmkit.image.load import ImageSource, load_image
from vlmkit.image.plan import ImagePlan
from vlmkit.load import EncodedImage, LoadedModel
from vlmkit.sampling import GenerationConfig
from vlmkit.text.chat import Message


@dataclass
class ChatImage:
    """An image of the conversation: where it came from, and once prompted, its plan and encoded rows."""

    image: Image.Image
    source: str | None  # the path it was loaded from; None for an in-memory image
    plan: ImagePlan | None = None
    encoded: EncodedImage | None = None  # its rows (T_i, C) at the LM width and position inputs, once encoded


class ChatSession:
    """The state of one conversation: messages in vlmkit's chat form, their images and cached features."""

    def __init__(self, loaded: LoadedModel, generation_config: GenerationConfig | None = None,
                 system: str | None = None) -> None:
        self.loaded = loaded
        self.generation_config = generation_config or GenerationConfig()
        self.system = system
        self.model: nn.Module = loaded.model
        self.vision_calls = 0  # encode_images calls (each runs the vision tower once over its images)
        self.last_result: GenerationResult | None = None  # the last finished answer: ids, finish reason
        self.last_prompt_tokens = 0  # prompt length of the last answer, image tokens included
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays), its images and their cached features."""
        self.messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list[ChatImage] = []  # images of self.messages, in message order
        self.pending: list[ChatImage] = []  # attached, shown with the next user turn

    def attach_image(self, image: ImageSource) -> ChatImage:
        """Load an image (a path, bytes, a data URL, a PIL image ...) to go with the next user turn.
        Raises ImageLoadError (a ValueError) for a missing or unreadable file, ValueError for a text-only model."""
        if not self.loaded.takes_images:
            raise ValueError(f"{self.loaded.name} is a text-only model; it cannot take images")
        source = str(image) if isinstance(image, (str, Path)) else None
        attached = ChatImage(load_image(image), source)
        self.pending.append(attached)
        return attached

    def ask(self, text: str) -> Iterator[str]:
        """Send a user turn (with the pending images) and stream the answer's text pieces.

        The prompt is built here, so a bad turn raises ValueError at once and changes nothing.
        When the answer is exhausted (or the iterator is closed early), the user turn and the
        answer so far join the history; if generation fails, the history is unchanged.
        """
        if not text.strip():
            raise ValueError("the message is empty; type a question")
        user = self._user_message(text, len(self.pending))
        images = self.images + self.pending
        ids, prefill = self._inputs(self.messages + [user], images)
        return self._answer(user, ids, prefill)

    @torch.inference_mode()
    def next_turn_logits(self, text: str) -> torch.Tensor:
        """The logits (1, T, V) the model gives the conversation plus a user turn `text` (with the pending
        images) and the assistant opening, computed from the cached image rows; the history is unchanged."""
        user = self._user_message(text, len(self.pending))
        ids, prefill = self._inputs(self.messages + [user], self.images + self.pending)
        return self.model(input_ids=torch.tensor([ids], device=self.loaded.device), **prefill).logits  # (1, T, V)

    def save(self, path: str | Path) -> None:
        """Write the conversation as JSON: {"model", "messages", "images"}, images being the paths of the
        messages' image parts in order (null for an image given in memory)."""
        record = {"model": self.loaded.name, "messages": self.messages,
                  "images": [image.source for image in self.images]}
        Path(path).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- internals -------------------------------------------------------------------------------------

    @staticmethod
    def _user_message(text: str, num_images: int) -> Message:
        return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}

    def _inputs(self, messages: list[Message], images: list[ChatImage]) -> tuple[list[int], dict[str, Any]]:
        """Prompt ids of messages (with the generation prompt) and the prefill keywords: image_embeds, the
        image rows in placeholder order, and the position inputs in the same order; images that have no
        rows yet are encoded first."""
        if not self.loaded.takes_images:
            return self.loaded.prompt(messages).ids, {}
        new = [image for image in images if image.plan is None]
        for image, plan in zip(new, self.loaded.plan_images([image.image for image in new])):
            image.plan = plan
        prompt = self.loaded.prompt(messages, [image.plan for image in images])
        self._encode([image for image in images if image.encoded is None])
        image_of = {id(image.plan): image for image in images}
        shown = [image_of[id(plan)].encoded for plan in prompt.plans]  # placeholder order (an image may repeat)
        return prompt.ids, self.loaded.encoded_prefill(shown)

    def _encode(self, images: list[ChatImage]) -> None:
        """Run the vision side once over images (one batch) and keep each image's EncodedImage."""
        if not images:
            return
        self.vision_calls += 1
        for image, encoded in zip(images, self.loaded.encode([image.plan for image in images])):
            image.encoded = encoded

    def _answer(self, user: Message, ids: list[int], prefill: dict[str, Any]) -> Iterator[str]:
        pieces = stream(self.model, ids, self.generation_config, prefill_inputs=prefill,
                        tokenizer=self.loaded.tokenizer)
        said: list[str] = []
        try:
            for piece in pieces:  # decoding runs under inference_mode (generate.py)
                said.append(piece)
                yield piece
        except GeneratorExit:  # the caller stopped reading: keep what was said
            self._commit(user, "".join(said), len(ids), None)
            raise
        self._commit(user, "".join(said), len(ids), pieces.result)

    def _commit(self, user: Message, answer: str, prompt_tokens: int, result: GenerationResult | None) -> None:
        self.messages += [user, {"role": "assistant", "content": answer}]
        self.images += self.pending
        self.pending = []
        self.last_prompt_tokens, self.last_result = prompt_tokens, result
