"""From a conversation to prompt token ids: chat template -> tokens -> image placeholders expanded.

The template writes one image placeholder token (e.g. `<image>`) per image; each
is then expanded to the number of tokens that image costs, `plan.num_tokens` of
its ImagePlan (image/schemes/), the same count the VLM's feature layout checks.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmkit.image.plan import ImagePlan
from vlmkit.text.chat import ChatTemplate, Message
from vlmkit.text.tokenizer import Tokenizer


def expand_image_placeholders(ids: Sequence[int], image_token_id: int, tokens_per_image: Sequence[int]) -> list[int]:
    """Replace the i-th occurrence of image_token_id with tokens_per_image[i] copies of it.

        >>> expand_image_placeholders([5, 9, 6, 9], image_token_id=9, tokens_per_image=[2, 3])
        [5, 9, 9, 6, 9, 9, 9]
    """
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(tokens_per_image):
        raise ValueError(f"the prompt has {found} image placeholder(s) but {len(tokens_per_image)} image(s) "
                         "were given; put one image part in the messages per image")
    out: list[int] = []
    images = iter(tokens_per_image)
    for t in ids:
        out.extend([t] * next(images) if t == image_token_id else [t])
    return out


def build_prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                     image_token_id: int | None = None, plans: Sequence[ImagePlan] = (),
                     add_generation_prompt: bool = True) -> list[int]:
    """Render messages with the template, tokenize, and expand image placeholders.

    plans has one ImagePlan per image part in the messages, in order; image i
    gets plans[i].num_tokens placeholder ids.
    """
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    ids = tokenizer.encode(text)
    if image_token_id is None:
        if plans:
            raise ValueError("images were given but this model has no image placeholder token (text-only model)")
        return ids
    return expand_image_placeholders(ids, image_token_id, [plan.num_tokens for plan in plans])
