"""The demo's tiny VLM: a CNN-stem vision tower, a CTC reading head, a projector and a character-level LM.

    pixels (B, 3, H, W), H a multiple of 32, W of 4
      --stem: 4 conv3x3 (strides 1, 2, 2, (2, 1)), GroupNorm, GELU-->  (B, D, H/8, W/4)
      --4x1 merge: 4 stem rows -> one token, Linear(4D -> D), + row/column embeddings-->  (B, H/32 * W/4, D)
      --transformer layers (vit.EncoderLayer)-->  features (B, T, D)     # a 32x256 line: T = 64 tokens
    ctc = CTCHead(features)                       # (B, T, V_ctc): the vision vocabulary (models/ctc.py)
    shape = shape_head(mean of features)          # (B, 8 + 3): easy-VQA's colour and shape classes
    image tokens = mlp(features) + softmax(ctc) @ E   # E: the LM's own embedding rows of the CTC characters
                   + softmax(colour) @ W_colour + softmax(shape) @ W_shape   # the same on every token
    LM input: <s> [image tokens] question "\\n" answer </s>   -> CausalLM (models/lm.py), tied embeddings

Why the CTC head feeds the projector. A tower trained from scratch learns to read fastest with a CTC loss
(in pilots, autoregressive training alone stayed at chance on a CPU for minutes). The head's per-step character
posteriors, mapped through the LM's own (tied) character embeddings, make each image token look like the
character it shows, and their running count is the image token's RoPE position: the token showing answer
character t sits at the same position as the LM query that predicts character t, so the decoder's job is to
copy what is at relative distance 0 instead of discovering the alignment. To make that path exist from the
first step, head 0 of the LM's first layer starts as a position-matching head (`init_copy_head`: equal
constant query and key on the fastest RoPE frequencies); in pilots the answers' NED after 100 / 200 joint
steps went from 0.86 / 0.34 without it to 0.33 / 0.11 with it. The answer is still the LM's own
autoregressive output (vlmkit.generate): it reads the features, can overrule the head, and answers
questions about non-text images (shapes) where the count means nothing.

Why the colour/shape head feeds the projector too. The head reads the class off the pooled features
(100% on held-out "what" questions), but the LM answered yes/no questions ("is there a circle?") from the
raw features only ~84% right: it had to find the class spread over the tokens and compare it with the
question's word. Its probabilities, mapped through learned per-class vectors W (one LM-width row per colour
and shape word, initialised to the mean of the LM's embeddings of the word's tokens), put an explicit class
representation on every image token, as the CTC path puts the character there.

Class words in the question, grounded in the image (DemoConfig.mark_class_words, ground_class_words; the
default demo turns both on). The "what" questions were 100% right with the class on the image tokens, but
easy-VQA's yes/no answer is the exclusive-or of "is the question's class in the image" and "is the question
negated", and under the data's draws neither alone predicts it: the LM answered by the question's form
("is there a X?" is "no" 82% of the time) and stayed at that form's baseline (~85%) in every run. Two things
are added to the embeddings of a whole colour or shape word's characters in the question:
    mark:    W[k]                              # the class vector the image tokens carry, k the word's class
    ground:  (2 p_k - 1) * match_embed         # p_k: the image's probability of class k (the head's softmax)
so "is this word's class in the image" becomes one learned direction of the word, plus for a match and minus
for a miss: a word-image alignment score, as open-vocabulary detectors (GLIP) score the phrases of a prompt
against image regions. The LM still learns the negation and the answer (docs/demo.md gives the
runs with and without it). encode_images carries the image's class probabilities in its rows, so the chat's
encode-once path grounds the words as the pixels do.

Soft count (detached, so only the CTC loss shapes it): with p_j the posteriors of step j (blank = 0),
    new_j = sum_c>0 p_j[c] * (1 - p_{j-1}[c])         # step j starts a character
    n_j   = sum_{i <= j} new_i                         # characters read up to step j
    position(image token j) = s - 1 + n_j              # s: position of the last prompt token ("\\n")

Loss: ar_weight * mean next-token cross-entropy on the answer (+ </s>) + ctc_weight * CTC loss on the text
images of the batch (`ctc_targets`, `ctc_lengths`; length 0 = not a text image) + frame_weight * per-step
cross-entropy against the renderer's character positions (`ctc_frames`, demo.data.frame_targets: the peaky
alignment CTC would have to discover, given outright for synthetic lines). `ar_weight = 0` skips the LM
(the warm-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig, Serializable, VisionConfig
from vlmkit.demo.scheme import ROW_MERGE, demo_tokens, token_grid
from vlmkit.models.ctc import CTCHead, ctc_greedy_decode, ctc_loss
from vlmkit.models.image_model import ImageModel, scatter_rows
from vlmkit.models.lm import IGNORE_INDEX, CausalLM, CausalLMOutput, KVCache
from vlmkit.models.projectors import build_projector
from vlmkit.models.vit import EncoderLayer

SHAPE_CLASSES = (8, 3)  # easy-VQA's colours and shapes (demo.data.SHAPE_COLOURS, SHAPE_NAMES)


@dataclass
class DemoConfig(Serializable):
    """Sizes of the demo VLM. ctc_to_lm maps CTC class k (1..V_ctc-1) to the LM token id of its character."""

    lm_vocab_size: int
    ctc_to_lm: tuple[int, ...]
    image_token_id: int
    prompt_end_id: int  # the token that ends every question ("\n"): the LM query before the first answer token
    class_words: tuple[tuple[int, ...], ...] = ()  # LM token ids of the colour then shape words (W's start)
    width: int = 192  # vision width D
    vision_layers: int = 2
    vision_heads: int = 4
    stem_channels: tuple[int, int, int] = (32, 64, 128)
    max_rows: int = 4  # token rows (image height / 32)
    max_cols: int = 64  # token columns (image width / 4)
    lm_width: int = 256
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 512
    stem_norm: str = "group"  # "group" or "batch"
    copy_head: float = 4.7  # > 0: LM layer 0's head 0 starts as a position-matching head of this strength
    aligned_positions: bool = True  # image tokens at the CTC count's RoPE positions (see module docstring)
    letter_ids: tuple[int, ...] = ()  # LM ids of the letters: a question's class word must stand between non-letters
    mark_class_words: bool = False  # add W's class vector to the characters of a class word in the question
    ground_class_words: bool = False  # also add (2 p - 1) * match_embed there, p the image's probability of that class
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:  # the tuples come back as JSON lists from a saved config
        self.ctc_to_lm, self.stem_channels = tuple(self.ctc_to_lm), tuple(self.stem_channels)  # type: ignore[assignment]
        self.letter_ids = tuple(self.letter_ids)
        self.class_words = tuple(tuple(ids) for ids in self.class_words)

    @property
    def image_scheme(self) -> str:
        """The demo's images are planned by its own scheme (demo/scheme.py)."""
        return "demo"

    @property
    def ctc_vocab_size(self) -> int:
        return len(self.ctc_to_lm) + 1


def _conv(cin: int, cout: int, stride: int | tuple[int, int], norm: str = "group") -> nn.Sequential:
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(8, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), layer, nn.GELU())


class CNNTower(nn.Module):
    """The demo's vision tower: a 4-conv stem (stride 8 x 4), 4x1 row merging, transformer layers.

    (B, 3, H, W) -> (B, rows*cols, D) features, rows = H/32, cols = W/4, row-major; `grid(pixels)` gives
    (rows, cols)."""

    def __init__(self, cfg: DemoConfig, lm: CausalLM | None = None) -> None:
        """lm: a pretrained language model to attach instead of a fresh one (its width must be cfg.lm_width)."""
        super().__init__()
        if lm is not None and lm.cfg.hidden_size != cfg.lm_width:
            raise ValueError(f"the attached LM is {lm.cfg.hidden_size} wide but cfg.lm_width is {cfg.lm_width}")
        c1, c2, c3 = cfg.stem_channels
        D = cfg.width
        n = cfg.stem_norm
        self.stem = nn.Sequential(_conv(3, c1, 1, n), _conv(c1, c2, 2, n), _conv(c2, c3, 2, n), _conv(c3, D, (2, 1), n))
        self.merge = nn.Linear(ROW_MERGE * D, D)
        self.row_embed = nn.Parameter(torch.zeros(cfg.max_rows, D))
        self.col_embed = nn.Parameter(torch.randn(cfg.max_cols, D) * 0.02)
        vcfg = VisionConfig(image_size=32, patch_size=8, hidden_size=D, intermediate_size=4 * D,
                            num_layers=max(1, cfg.vision_layers), num_heads=cfg.vision_heads, hidden_act="gelu",
                            use_cls_token=False, pre_layernorm=False, select_layer=-1)
        self.layers = nn.ModuleList(EncoderLayer(vcfg) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(D)
        self.cfg = cfg

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of tokens for (B, 3, H, W) pixels; raises on sizes the tower cannot take."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, 3, H, W)")
        return token_grid(self.cfg, *pixel_values.shape[2:])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid(pixel_values)
        x = self.stem(pixel_values)  # (B, D, 4*rows, cols)
        B, D = x.shape[:2]
        x = x.view(B, D, rows, ROW_MERGE, cols).permute(0, 2, 4, 3, 1).reshape(B, rows, cols, ROW_MERGE * D)
        x = self.merge(x) + self.row_embed[:rows, None] + self.col_embed[None, :cols]  # (B, rows, cols, D)
        x = x.reshape(B, rows * cols, D)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # (B, T, D)


def soft_char_count(posteriors: torch.Tensor) -> torch.Tensor:
    """(B, T, V) CTC posteriors (blank = 0) -> (B, T) expected number of characters read up to each step.

    >>> p = torch.tensor([[[0., 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]])  # a a _ a b
    >>> soft_char_count(p).tolist()
    [[1.0, 1.0, 1.0, 2.0, 3.0]]
    """
    chars = posteriors[..., 1:]  # (B, T, V-1)
    previous = F.pad(chars[:, :-1], (0, 0, 1, 0))  # (B, T, V-1), zeros before the first step
    new = (chars * (1 - previous)).sum(-1)  # (B, T)
    return new.cumsum(dim=1)


class DemoVLM(ImageModel):
    """Tower + CTC head + projector + LM; a forward that trains (AR + CTC) and generates (vlmkit.generate).

    forward(input_ids (B, L) with T image placeholders per row after <s>, pixel_values, labels, ctc_targets,
    ctc_lengths, attention_mask, cache, ...) -> CausalLMOutput. Set `ar_weight` / `ctc_weight` to weigh
    the two losses (ar_weight 0: the CTC warm-up, the LM does not run). It is an ImageModel: the `demo`
    scheme (demo/scheme.py) plans a user's image as the demo's data did and encodes images once for reuse
    (encode_images, forward(image_embeds=...)); demo/saved.py saves and loads it."""

    config_class = DemoConfig

    def __init__(self, cfg: DemoConfig, lm: CausalLM | None = None) -> None:
        """lm: a pretrained language model to attach instead of a fresh one (its width must be cfg.lm_width)."""
        super().__init__(cfg)
        if lm is not None and lm.cfg.hidden_size != cfg.lm_width:
            raise ValueError(f"the attached LM is {lm.cfg.hidden_size} wide but cfg.lm_width is {cfg.lm_width}")
        self.vision = CNNTower(cfg)
        self.ctc = CTCHead(cfg.width, cfg.ctc_vocab_size, rows=1, merge_cols=1)
        self.projector = build_projector("mlp2x_gelu", cfg.width, cfg.lm_width)
        self.blank_embed = nn.Parameter(torch.zeros(cfg.lm_width))  # the blank's row of E
        if lm is None:
            lm = CausalLM(LMConfig(vocab_size=cfg.lm_vocab_size, hidden_size=cfg.lm_width,
                                   intermediate_size=cfg.lm_intermediate, num_layers=cfg.lm_layers,
                                   num_heads=cfg.lm_heads, tie_word_embeddings=True, max_position_embeddings=512,
                                   qkv_bias=cfg.copy_head > 0))
            nn.init.normal_(lm.embed.weight, std=0.02)  # tied: small logits at the start
            if cfg.copy_head > 0:
                init_copy_head(lm, cfg.copy_head)
        self.lm = lm
        self.shape_head = nn.Linear(cfg.width, SHAPE_CLASSES[0] + SHAPE_CLASSES[1])  # colour and shape, mean-pooled
        self.class_embed = nn.Parameter(self._class_word_embeddings(cfg.class_words))  # (8 + 3, C): W
        # the direction of "this question word's class is in the image" (cfg.ground_class_words)
        self.match_embed = nn.Parameter(torch.randn(cfg.lm_width) * 0.02) if cfg.ground_class_words else None
        self.register_buffer("ctc_to_lm", torch.tensor(cfg.ctc_to_lm, dtype=torch.long), persistent=False)
        self.ar_weight, self.ctc_weight, self.frame_weight, self.shape_weight = 1.0, 1.0, 0.0, 1.0

    def _class_word_embeddings(self, class_words: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        """(8 + 3, C) start of W: each class word's mean LM embedding (zeros when class_words is empty)."""
        n = SHAPE_CLASSES[0] + SHAPE_CLASSES[1]
        if not class_words:
            return self.blank_embed.new_zeros(n, self.cfg.lm_width)
        if len(class_words) != n or not all(class_words):
            raise ValueError(f"class_words needs {n} non-empty token id lists (the colour then shape words), "
                             f"got {len(class_words)}")
        with torch.no_grad():
            return torch.stack([self.lm.embed.weight[list(ids)].mean(0) for ids in class_words]).clone()

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens of a height x width image (the placeholders its prompt needs; the scheme's count)."""
        return demo_tokens(self.cfg, height, width)

    def read(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, T, D), CTC logits (B, T, V_ctc)) of (B, 3, H, W) pixels."""
        features = self.vision(pixel_values.to(next(self.vision.parameters()).dtype))  # as the weights (--dtype)
        return features, self.ctc(features, (1, features.shape[1]))

    def ctc_read(self, pixel_values: torch.Tensor) -> list[list[int]]:
        """Greedy CTC reading (class ids, no blanks) of (B, 3, H, W) text images: the head alone, for diagnostics."""
        return ctc_greedy_decode(self.read(pixel_values)[1])

    def shape_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 8 + 3) colour then shape logits of the mean-pooled features (B, T, D)."""
        return self.shape_head(features.mean(1)).float()

    def image_tokens(self, features: torch.Tensor, logits: torch.Tensor,
                     shape_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, T, C) at the LM width, soft character counts (B, T), class probabilities (B, 8 + 3)) of a
        tower output (shape_logits: the head's output on these features, computed here when not given)."""
        p = logits.float().softmax(-1)  # (B, T, V_ctc)
        table = torch.cat([self.blank_embed[None], self.lm.embed.weight[self.ctc_to_lm]])  # (V_ctc, C)
        tokens = self.projector(features) + (p.to(table.dtype) @ table)  # (B, T, C)
        if shape_logits is None:
            shape_logits = self.shape_logits(features)
        classes = class_probabilities(shape_logits)  # (B, 8 + 3)
        tokens = tokens + (classes.to(self.class_embed.dtype) @ self.class_embed)[:, None]  # (B, 1, C) on each
        return tokens, soft_char_count(p.detach()), classes

    def _split_rows(self, image_embeds: Sequence[torch.Tensor], batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (B, T, C), counts (B, T), class probabilities (B, 11)) of encode_images' rows (the demo
        scheme's encoder, demo/scheme.py), one image per prompt row."""
        C, n = self.cfg.lm_width, sum(SHAPE_CLASSES)
        if (len(image_embeds) != batch or any(e.dim() != 2 or e.shape[-1] != C + 1 + n for e in image_embeds)
                or len({e.shape for e in image_embeds}) > 1):
            raise ValueError(f"image_embeds must be one (T, {C + 1 + n}) tensor from encode_images per prompt row "
                             f"({batch}); got {[tuple(e.shape) for e in image_embeds]}")
        rows = torch.stack(list(image_embeds))  # (B, T, C + 1 + 11)
        return rows[..., :C], rows[..., C], rows[:, 0, C + 1:]

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None, ctc_targets: torch.Tensor | None = None,
                ctc_lengths: torch.Tensor | None = None, ctc_frames: torch.Tensor | None = None,
                shape_targets: torch.Tensor | None = None, logits_to_keep: int = 0,
                loss_only: bool = False, image_embeds: Sequence[torch.Tensor] | None = None) -> CausalLMOutput:
        """image_embeds: encode_images' rows of the prompt rows' images, instead of pixel_values."""
        vision_term = None
        if image_embeds is not None:
            if pixel_values is not None:
                raise ValueError("pass the images once: pixel_values or image_embeds (encoded rows), not both")
            tokens, counts, classes = self._split_rows(image_embeds, input_ids.shape[0])
        elif pixel_values is None:  # a decoding step: text only, positions from the cache
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, labels=labels,
                           logits_to_keep=logits_to_keep, loss_only=loss_only)
        else:
            features, logits = self.read(pixel_values)
            vision_term = self.vision_loss(logits, ctc_targets, ctc_lengths, ctc_frames)
            shape_logits = self.shape_logits(features)  # (B, 8 + 3)
            if shape_targets is not None and self.shape_weight > 0 and bool((shape_targets != IGNORE_INDEX).any()):
                shape_term = self.shape_weight * self.shape_loss(shape_logits, shape_targets)
                vision_term = shape_term if vision_term is None else vision_term + shape_term
            if self.ar_weight == 0:
                if vision_term is None:
                    raise ValueError("ar_weight is 0 (CTC warm-up) but the batch has no ctc_targets or ctc_frames")
                return CausalLMOutput(logits=None, loss=vision_term)
            tokens, counts, classes = self.image_tokens(features, logits, shape_logits)  # (B, T, C), (B, T), (B, 11)
        is_image = input_ids == self.image_token_id  # (B, L)
        per_row = is_image.sum(1)
        if bool((per_row != tokens.shape[1]).any()):
            raise ValueError(f"each prompt must hold {tokens.shape[1]} image placeholders (id {self.image_token_id}) "
                             f"for its image; got {per_row.tolist()}")
        embeds = scatter_rows(input_ids, self.lm.embed(input_ids), list(tokens), self.image_token_id)  # (B, L, C)
        if self.cfg.mark_class_words or self.cfg.ground_class_words:
            embeds = embeds + self.question_class_vectors(input_ids, is_image, classes).to(embeds.dtype)
        positions = self._positions(input_ids, attention_mask, is_image, counts)  # (B, L)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, cache=cache,
                      labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only)
        if out.loss is not None:
            out.loss = self.ar_weight * out.loss + (vision_term if vision_term is not None else 0.0)
        return out

    def _after_image(self, input_ids: torch.Tensor, is_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(after_image, ends), both (B, L): the tokens after each row's last image placeholder, and the
        prompt_end_id tokens among them (the first one ends the question)."""
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        after_image = index[None] > (is_image * index[None]).amax(1, keepdim=True)
        return after_image, (input_ids == self.cfg.prompt_end_id) & after_image

    def question_class_words(self, input_ids: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """(B, L) class index + 1 on each character of a whole colour or shape word (cfg.class_words, between
        non-letters) in the question, the text after the image up to the first prompt_end_id; 0 elsewhere.
        Answers are never marked: generation feeds its tokens one at a time, without this pass."""
        L = input_ids.shape[1]
        after_image, ends = self._after_image(input_ids, is_image)
        question = after_image & ~(ends.long().cumsum(1) > 0)  # (B, L)
        letters = torch.isin(input_ids, torch.tensor(self.cfg.letter_ids, device=input_ids.device))  # (B, L)
        marks = torch.zeros_like(input_ids)
        for k, word in enumerate(self.cfg.class_words):
            n = len(word)
            if n > L:
                continue
            windows = input_ids.unfold(1, n, 1)  # (B, L - n + 1, n)
            found = (windows == torch.tensor(word, device=input_ids.device)).all(-1)  # (B, L - n + 1)
            before = F.pad(letters, (1, 0))[:, :L - n + 1]  # the token before each window (none at 0)
            after = F.pad(letters, (0, 1))[:, n:]  # the token after each window (none at the end)
            found &= ~before & ~after
            for offset in range(n):
                hit = F.pad(found, (offset, n - 1 - offset))  # (B, L): window starts shifted to character offset
                marks = torch.where(hit & question, k + 1, marks)
        return marks

    def question_class_vectors(self, input_ids: torch.Tensor, is_image: torch.Tensor,
                               classes: torch.Tensor) -> torch.Tensor:
        """(B, L, C) added to the characters question_class_words marks (0 elsewhere): with cfg.mark_class_words
        W's row of the word's class, the vector the image tokens carry; with cfg.ground_class_words
        (2 p - 1) * match_embed, p the image's probability of that class (classes (B, 8 + 3),
        class_probabilities), so that "is this word's class in the image" is one direction of the word's
        embedding, plus for a match and minus for a miss (a word-image alignment score, as open-vocabulary
        detectors score phrases against regions). See the module docstring for why."""
        marks = self.question_class_words(input_ids, is_image)  # (B, L), 0 = not a class word
        vectors = torch.zeros(*marks.shape, self.cfg.lm_width, dtype=self.class_embed.dtype, device=marks.device)
        if self.cfg.mark_class_words:
            table = torch.cat([self.class_embed.new_zeros(1, self.cfg.lm_width), self.class_embed])  # (1 + 11, C)
            vectors = vectors + F.embedding(marks, table)
        if self.cfg.ground_class_words:
            p = F.pad(classes.float(), (1, 0)).gather(1, marks)  # (B, L): the marked class's probability
            match = torch.where(marks > 0, 2 * p - 1, torch.zeros_like(p))
            vectors = vectors + match[..., None].to(vectors.dtype) * self.match_embed
        return vectors

    def shape_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head's colour and shape logits (B, colours + shapes) against targets (B, 2),
        IGNORE_INDEX where unknown: the shape vocabulary of the tower, as the CTC head is its text vocabulary."""
        colours = SHAPE_CLASSES[0]
        terms = [F.cross_entropy(part, t, ignore_index=IGNORE_INDEX)
                 for part, t in ((logits[:, :colours], targets[:, 0]), (logits[:, colours:], targets[:, 1]))
                 if bool((t != IGNORE_INDEX).any())]
        return sum(terms) / len(terms)

    def vision_loss(self, logits: torch.Tensor, ctc_targets: torch.Tensor | None, ctc_lengths: torch.Tensor | None,
                    ctc_frames: torch.Tensor | None) -> torch.Tensor | None:
        """ctc_weight * CTC loss on the rows with targets + frame_weight * per-step cross-entropy on the rows
        with frame targets (ctc_frames (B, T), IGNORE_INDEX where unknown); None when neither applies."""
        terms = []
        if ctc_targets is not None and self.ctc_weight > 0:
            text = ctc_lengths > 0
            if bool(text.any()):
                terms.append(self.ctc_weight * ctc_loss(logits[text], ctc_targets[text], ctc_lengths[text]))
        if ctc_frames is not None and self.frame_weight > 0 and bool((ctc_frames != IGNORE_INDEX).any()):
            if ctc_frames.shape != logits.shape[:2]:
                raise ValueError(f"ctc_frames has shape {tuple(ctc_frames.shape)} but the image gives "
                                 f"{tuple(logits.shape[:2])} steps")
            terms.append(self.frame_weight * F.cross_entropy(logits.float().flatten(0, 1), ctc_frames.flatten(),
                                                             ignore_index=IGNORE_INDEX))
        return sum(terms) if terms else None

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, is_image: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
        """RoPE positions (B, L): text tokens count real tokens from 0; image token j gets s - 1 + n_j, s the
        position of the question's end (the first prompt_end_id after the image), which predicts the first
        answer token. Training, cached and naive generation all find the same s."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        natural = (mask.long().cumsum(-1) - 1).clamp(min=0).float()  # (B, L)
        if not self.cfg.aligned_positions:
            return natural
        _, ends = self._after_image(input_ids, is_image)
        if not bool(ends.any(1).all()):
            raise ValueError(f"every prompt must end its question with token {self.cfg.prompt_end_id} (the newline) "
                             "after the image placeholders")
        s = natural.gather(1, ends.float().argmax(1, keepdim=True))  # (B, 1)
        aligned = (s - 1 + counts).to(natural.dtype)  # (B, T)
        return natural.masked_scatter(is_image, aligned)


@torch.no_grad()
def init_copy_head(lm: CausalLM, strength: float, pairs: int = 8) -> None:
    """Make head 0 of layer 0 attend by position only: its query and key are the same constant vector
    (biases; weights zero) on the `pairs` fastest RoPE frequency pairs, so its score peaks at relative
    distance 0: the image token at the query's aligned position (and the query itself). Its value and output
    start as they are; everything trains from here."""
    attn = lm.layers[0].attn
    hd, nh = attn.hd, attn.nh
    c = attn.qkv.bias.new_zeros(hd)
    c[:pairs] = strength
    c[hd // 2:hd // 2 + pairs] = strength
    for start in (0, nh * hd):  # query head 0, key head 0
        attn.qkv.weight[start:start + hd] = 0
        attn.qkv.bias[start:start + hd] = c


def class_probabilities(shape_logits: torch.Tensor) -> torch.Tensor:
    """(B, 8 + 3) colour probabilities then shape probabilities (a softmax over each kind) of shape logits."""
    colours = SHAPE_CLASSES[0]
    return torch.cat([shape_logits[:, :colours].softmax(-1), shape_logits[:, colours:].softmax(-1)], -1)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of module (shared ones once)."""
    return sum(p.numel() for p in module.parameters())
