"""From a conversation to prompt token ids: chat template -> image placeholders found in the text -> ids.

The template renders each image as a placeholder: the image token's own text (`<image>`),
taken in order, or a numbered `<|image_N|>` (Phi-3-vision), which names image N (1-based).
The rendered prompt is split on the placeholder pattern at the text level, so the numbered
placeholders need not be tokens of the vocabulary, and every placeholder becomes a run of
`plan.num_tokens` image token ids, the count of the image's ImagePlan (vlmkit.schemes) that
the VLM's feature layout checks.

Numbered placeholders, the rule (it is that of Phi-3-vision's processor, `processing_phi3_v.py`:
each `<|image_N|>` is replaced by image N's token run; the numbers used must be exactly
1..len(images)): they may come in any order and repeat. The model fills image runs in prompt
order, so `build_prompt` returns the plans in that order (a repeated image twice): pass
`Prompt.plans` to `image_inputs`. Phi-3-vision's model instead fills the runs with the images in
the order given, which is only right when the placeholders read 1, 2, ... once each.

A video is a content part {"type": "video"}; its entry in `plans` is a list of plans. Two ways:
- frames as images (no video_token_id; LLaVA-style models): the list holds the plans of its frames
  (the scheme's plan_video), and the part is rendered as that many image parts, so every template
  that knows image parts can show a video;
- native video (video_token_id given; Qwen2-VL / Qwen2.5-VL): the list holds the clip's one plan
  (schemes/dynamic.plan_video_dynamic), the template renders the part as its video
  placeholder (the video token's text, `<|video_pad|>`), and that placeholder becomes a run of
  plan.num_tokens video token ids, images' placeholders runs of image ids, each kind taking its
  plans in message order. The count is the plan's: nothing here computes a token count.

Tokenizing: when the image token's text encodes to exactly the image token id (the usual case:
`<image>` is an added token), the prompt is tokenized in one pass with every placeholder written
as that text, as transformers' LLaVA processors do; segment-wise tokenization would differ for
tokenizers that prefix the start of every encode (sentencepiece's Metaspace "first" scheme).
Otherwise the text segments between placeholders are tokenized one by one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vlmkit.image.plan import ImagePlan, MediaPlans
from vlmkit.text.chat import ChatTemplate, Message
from vlmkit.text.tokenizer import Tokenizer

NUMBERED_PLACEHOLDER = r"<\|image_(\d+)\|>"  # Phi-3-vision's <|image_1|>, <|image_2|>, ...



@dataclass
class Prompt:
    """Prompt token ids and, in prompt order, the plan of every image-token run in them."""

    ids: list[int]
    plans: list[ImagePlan]


def placeholder_order(text: str, num_images: int, plain: str | None = "<image>") -> tuple[list[str], list[int]]:
    """Split text on image placeholders: (the len(order) + 1 text segments around them, and for each
    placeholder the 0-based index of the image it shows). Plain placeholders take images in order.

        >>> placeholder_order("a<image>b<image>", 2)
        (['a', 'b', ''], [0, 1])
        >>> placeholder_order("<|image_2|> vs <|image_1|>, again <|image_2|>", 2)
        (['', ' vs ', ', again ', ''], [1, 0, 1])
    """
    pattern = NUMBERED_PLACEHOLDER if plain is None else f"{re.escape(plain)}|{NUMBERED_PLACEHOLDER}"
    matches = list(re.finditer(pattern, text))
    segments, start = [], 0
    for m in matches:
        segments.append(text[start:m.start()])
        start = m.end()
    segments.append(text[start:])
    numbers = [m.group(1) for m in matches]
    if any(n is None for n in numbers) and any(n is not None for n in numbers):
        raise ValueError(f"the prompt mixes plain {plain} and numbered <|image_N|> placeholders; "
                         "write one kind only")
    if not matches or numbers[0] is None:
        if len(matches) != num_images:
            raise ValueError(f"the prompt has {len(matches)} image placeholder(s) ({plain}) but {num_images} "
                             "image(s) were given; put one image part in the messages per image")
        return segments, list(range(num_images))
    order = [int(n) - 1 for n in numbers]
    missing = sorted({i + 1 for i in order if not 0 <= i < num_images})
    if missing:
        raise ValueError(f"the prompt has the placeholder <|image_{missing[0]}|> but only {num_images} image(s) "
                         f"were given (numbers run 1..{num_images})")
    unused = sorted(set(range(num_images)) - set(order))
    if unused:
        raise ValueError(f"image(s) {[i + 1 for i in unused]} were given but no <|image_N|> placeholder "
                         "refers to them; reference every image or drop it")
    return segments, order


def videos_as_images(messages: Sequence[Message], frames_per_video: Sequence[int]) -> list[Message]:
    """The messages with the i-th {"type": "video"} part replaced by frames_per_video[i] image parts.

        >>> videos_as_images([{"role": "user", "content": [{"type": "video"}]}], [2])[0]["content"]
        [{'type': 'image'}, {'type': 'image'}]
    """
    videos = iter(frames_per_video)
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "video":
                    count = next(videos, None)
                    if count is None:
                        raise ValueError(f"the messages have more video parts than the {len(frames_per_video)} "
                                         "video(s) given; pass one list of plans per video part")
                    parts += [{"type": "image"}] * count
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    if next(videos, None) is not None:
        raise ValueError(f"{len(frames_per_video)} video(s) were given but the messages have fewer video parts; "
                         "put one {'type': 'video'} part per video")
    return out


def flat_plans(plans: Sequence[MediaPlans]) -> list[ImagePlan]:
    """Every image's plan in message order, a video's plans in its place."""
    return [q for p in plans for q in ([p] if isinstance(p, ImagePlan) else p)]


def flatten_media(messages: Sequence[Message], plans: Sequence[MediaPlans]) -> tuple[list[Message], list[ImagePlan]]:
    """Videos rendered as image parts, and every image's plan in message order."""
    videos = [list(p) for p in plans if not isinstance(p, ImagePlan)]
    if any(not v for v in videos):
        raise ValueError("a video was given with no plans; plan at least one frame (LoadedModel.plan_images)")
    return videos_as_images(messages, [len(v) for v in videos]), flat_plans(plans)


def encode_with_image_runs(tokenizer: Tokenizer, segments: Sequence[str], runs: Sequence[int], image_token_id: int,
                           segment_special_tokens: bool = False) -> list[int]:
    """Ids of segments[0] run[0] segments[1] run[1] ... segments[-1], a run being that many image ids;
    segment_special_tokens: each segment tokenized on its own with the tokenizer's special tokens (Phi-3-V's
    processor), instead of encode_with_runs' one pass."""
    if segment_special_tokens:
        out = tokenizer.encode(segments[0], add_special_tokens=True)
        for n, segment in zip(runs, segments[1:]):
            out += [image_token_id] * n + tokenizer.encode(segment, add_special_tokens=True)
        return out
    return encode_with_runs(tokenizer, segments, [(image_token_id, n) for n in runs])


def _token_text(tokenizer: Tokenizer, token_id: int) -> str | None:
    """The text of token_id when it encodes back to exactly that one id, else None."""
    try:
        marker = tokenizer.id_to_token(token_id)
    except ValueError:
        return None
    return marker if tokenizer.encode(marker) == [token_id] else None


def encode_with_runs(tokenizer: Tokenizer, segments: Sequence[str], runs: Sequence[tuple[int, int]]) -> list[int]:
    """Ids of segments[0] run[0] segments[1] run[1] ... segments[-1], a run (token_id, n) being n copies
    of token_id (an image's or a video's placeholder id)."""
    markers = [_token_text(tokenizer, token) for token, _ in runs]
    if None not in markers:
        text = segments[0] + "".join(m + seg for m, seg in zip(markers, segments[1:]))  # type: ignore[operator]
        ids = tokenizer.encode(text)  # one pass, as the reference processors tokenize
        run_ids = {token for token, _ in runs}
        if [t for t in ids if t in run_ids] == [token for token, _ in runs]:
            out: list[int] = []
            pending = iter(runs)
            for t in ids:
                out.extend([t] * next(pending)[1] if t in run_ids else [t])
            return out
    out = tokenizer.encode(segments[0])
    for (token, n), segment in zip(runs, segments[1:]):
        out += [token] * n + tokenizer.encode(segment)
    return out


def _native_video_prompt(tokenizer: Tokenizer, text: str, plans: Sequence[MediaPlans], image_token_id: int,
                         video_token_id: int) -> Prompt:
    """build_prompt for a model that takes video natively: each image placeholder (the image token's text)
    and video placeholder (the video token's text) in text becomes its plan's run, in message order."""
    queues: dict[int, list[ImagePlan]] = {image_token_id: [], video_token_id: []}
    for entry in plans:
        if isinstance(entry, ImagePlan):
            queues[image_token_id].append(entry)
        elif len(entry) != 1:
            raise ValueError(f"a video was given as {len(entry)} plans, but this model takes each clip as one plan "
                             "(schemes/dynamic.plan_video_dynamic of its sampled frames)")
        else:
            queues[video_token_id].append(entry[0])
    names = {image_token_id: "image", video_token_id: "video"}
    markers = {}
    for token, kind in names.items():
        marker = _token_text(tokenizer, token)
        if marker is None:
            raise ValueError(f"the {kind} token id {token} is not a single token of this tokenizer; the chat "
                             f"template's {kind} placeholder cannot be found in the prompt")
        markers[marker] = token
    matches = list(re.finditer("|".join(re.escape(m) for m in markers), text))
    for token, kind in names.items():
        found = sum(markers[m.group(0)] == token for m in matches)
        if found != len(queues[token]):
            raise ValueError(f"the prompt has {found} {kind} placeholder(s) ({tokenizer.id_to_token(token)}) but "
                             f"{len(queues[token])} {kind}(s) were given; put one {{'type': '{kind}'}} part in the "
                             f"messages per {kind}")
    segments, runs, ordered, start = [], [], [], 0
    taken = {token: iter(queue) for token, queue in queues.items()}
    for m in matches:
        token = markers[m.group(0)]
        plan = next(taken[token])
        segments.append(text[start:m.start()])
        runs.append((token, plan.num_tokens))
        ordered.append(plan)
        start = m.end()
    segments.append(text[start:])
    return Prompt(encode_with_runs(tokenizer, segments, runs), ordered)


ImageText = Callable[[ImagePlan, int, str], "str | None"]  # Scheme.image_text


def image_texts_prompt(tokenizer: Tokenizer, segments: Sequence[str], ordered: Sequence[ImagePlan],
                        image_token_id: int, image_text: ImageText) -> Prompt | None:
    """build_prompt's ids when the scheme writes each image as text around its image ids (image_text); None
    when it writes none of them (image_text gives None, or the image token has no text of its own)."""
    marker = _token_text(tokenizer, image_token_id)
    if marker is None:
        return None
    texts = [image_text(plan, k, marker) for k, plan in enumerate(ordered)]
    if all(t is None for t in texts):
        return None
    if any(t is None for t in texts):
        raise ValueError("the scheme writes some images of the prompt as text and others not; it must do all")
    ids = tokenizer.encode(segments[0] + "".join(t + seg for t, seg in zip(texts, segments[1:])))  # type: ignore[operator]
    found, want = ids.count(image_token_id), sum(p.num_tokens for p in ordered)
    if found != want:
        raise ValueError(f"the prompt holds {found} image ids ({marker}) but its images' plans need {want}: the "
                         "text around the images must not contain the image token; remove it from the messages")
    return Prompt(ids, list(ordered))


def build_prompt(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                 image_token_id: int | None = None, plans: Sequence[MediaPlans] = (),
                 add_generation_prompt: bool = True, video_token_id: int | None = None,
                 segment_special_tokens: bool = False, image_placeholder: str | None = None,
                 image_text: ImageText | None = None) -> Prompt:
    """Render messages with the template, then turn each image placeholder into its run of image ids.
    segment_special_tokens: the text between placeholders is tokenized piece by piece with the tokenizer's
    special tokens (the model's scheme says so: Scheme.segment_special_tokens, Phi-3-V).
    image_placeholder: the text the template writes for an image part, when not the image token's own
    (Scheme.image_placeholder); image_text: the text each placeholder becomes instead of the bare run, the
    run's ids written as the image token's text, tokenized with the prompt in one pass (Scheme.image_text,
    MiniCPM-V's `<image>...</image><slice>...</slice>` wrappers).

    plans has one entry per image or video part of the messages, in order: an ImagePlan for an
    image, a list of ImagePlans for a video. video_token_id: the model takes video natively (each
    video one plan, its placeholder a run of video ids); None: videos are shown as their frames.
    Returns the ids and the plans of the runs in prompt order (for image_inputs); see the module
    docstring for the placeholder rule.
    """
    if video_token_id is not None:
        if image_token_id is None:
            raise ValueError("video_token_id was given without image_token_id; a model that takes video has both")
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        return _native_video_prompt(tokenizer, text, plans, image_token_id, video_token_id)
    messages, flat = flatten_media(messages, plans)
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    if image_token_id is None:
        if flat:
            raise ValueError("images were given but this model has no image placeholder token (text-only model)")
        return Prompt(tokenizer.encode(text, add_special_tokens=segment_special_tokens), [])
    try:
        plain: str | None = image_placeholder or tokenizer.id_to_token(image_token_id)
    except ValueError:
        plain = None
    segments, order = placeholder_order(text, len(flat), plain)
    ordered = [flat[i] for i in order]
    if image_text is not None and ordered:
        written = image_texts_prompt(tokenizer, segments, ordered, image_token_id, image_text)
        if written is not None:
            return written
    return Prompt(encode_with_image_runs(tokenizer, segments, [p.num_tokens for p in ordered], image_token_id,
                                         segment_special_tokens), ordered)


def build_prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, messages: Sequence[Message],
                     image_token_id: int | None = None, plans: Sequence[MediaPlans] = (),
                     add_generation_prompt: bool = True, video_token_id: int | None = None,
                     segment_special_tokens: bool = False, image_placeholder: str | None = None,
                     image_text: ImageText | None = None) -> list[int]:
    """build_prompt's ids, for prompts whose placeholders show images 1, 2, ... once each in order
    (so image_inputs(plans) matches); other orders raise ValueError: use build_prompt."""
    prompt = build_prompt(tokenizer, template, messages, image_token_id, plans, add_generation_prompt,
                          video_token_id, segment_special_tokens, image_placeholder, image_text)
    if [id(p) for p in prompt.plans] != [id(p) for p in flat_plans(plans)]:
        raise ValueError("the prompt's placeholders show the images out of order or more than once; call "
                         "build_prompt and pass its .plans to image_inputs")
    return prompt.ids
