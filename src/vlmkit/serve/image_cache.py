"""The server's image-feature cache: encoded image rows kept between requests, keyed by the image's plan.

    cache = ImageFeatureCache(max_bytes=IMAGE_CACHE_MB * MB)     # 0: disabled
    encoder = CachedImageEncoder(loaded, cache)
    keys = [plan_key(plan) for plan in prompt.plans]            # in a request thread (hashing is not free)
    prefill = encoder.prefill([list(zip(keys, prompt.plans))])  # in the batcher's worker thread: one prompt,
    model(input_ids=ids, cache=kv, **prefill)                   # or several prefilled together (row order);
                                                                # image_embeds + position inputs, no pixels
    cache.stats()        # {"max_bytes", "entries", "bytes", "hits", "misses", "evictions"} for /health

A chat client (the web page, any OpenAI client) resends the conversation's images with every turn.
Every image model class has one interface for reusing encoded images (see chat_session.py):
`encode_images(**loaded.image_inputs(plans))` gives each image's (T_i, C) rows, and
`forward(..., image_embeds=rows, **positions)` takes them back, positions being the image_inputs
entries named by the class's `image_position_inputs` (Qwen2-VL's image_grid_thw). So the server
keeps each image's rows and its own row of each position input, and a request whose images are all
known skips the vision tower.

The key is a sha256 of the image's ImagePlan in full: the scheme, the sizes, the grid, the token
parts, every tensor (the views' pixel values, a second tower's views in `extra`) byte for byte with
its dtype and shape, and every other `extra` entry. `image_inputs` reads nothing but the plans, so two
images with equal keys give the vision tower equal inputs. Keying on the plan rather than the file
bytes means the same picture re-encoded (another PNG encoder, JPEG -> PNG round trip of identical
pixels) hits, while anything the plan depends on besides the pixels is part of the key: the tiles
scheme, for one, plans an image differently when the prompt holds more than two images.

Answers are the same with and without the cache: the rows are what forward would compute from the
pixels (the same encode_images call); an image's rows are computed in one encode_images call with the
other uncached images of its request and of the requests prefilled with it (the batcher's batched
prefill), so a float's last bits may differ from a batch of other images.

Bounded by bytes (each entry's rows and position tensors, measured from their storage): putting an
entry evicts the least recently used ones until the total fits; an entry larger than the whole bound
is used for its request and not kept. Thread-safe (one lock): the batcher's worker thread reads and
fills it while /health reads its counters on the event loop. `hits` and `misses` count each distinct
image of a request once; every miss is an image the vision tower encoded. Requests prefilled together
count as if one came after the other: an image one of them encodes is a hit for the later ones.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmkit.image.plan import ImagePlan
from vlmkit.load import EncodedImage, LoadedModel

MB = 1024 * 1024
IMAGE_CACHE_MB = 256  # default bound of the cache; e.g. ~27 LLaVA-1.5 images at float32 (576 x 4096 x 4 bytes)


def plan_key(plan: ImagePlan) -> str:
    """The cache key of an image: a sha256 over everything in its plan (see the module docstring)."""
    digest = hashlib.sha256()
    _feed(digest, [plan.scheme, plan.original_size, plan.resized_size, plan.grid, plan.parts, plan.text_parts])
    _feed(digest, plan.pixel_values)
    _feed(digest, plan.extra)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Hash value into digest with its type, so that e.g. (1, 2) and "(1, 2)" or [1] and [[1]] differ."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)  # to the host, for numpy
        digest.update(f"tensor:{flat.dtype}:{tuple(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"map:{len(value)}:".encode())
        for name in sorted(value, key=str):
            _feed(digest, str(name))
            _feed(digest, value[name])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq:{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        digest.update(f"{type(value).__name__}:{len(text)}:{text}".encode())
    else:
        raise TypeError(f"an image plan holds a {type(value).__name__}, which the image cache cannot key on; "
                        "plans may hold tensors, numbers, strings, and lists/tuples/dicts of them")


class ImageFeatureCache:
    """An LRU map from plan_key to EncodedImage, bounded by max_bytes (0 disables it); thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the image cache bound must be a whole number of bytes >= 0 (0 disables it), "
                             f"got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, EncodedImage] = OrderedDict()  # least recently used first
        self._bytes = self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> EncodedImage | None:
        """The entry for key (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: EncodedImage) -> None:
        """Keep entry under key, evicting the least recently used entries until the total fits max_bytes;
        an entry larger than max_bytes is not kept."""
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self._bytes += size

    def count_hit(self) -> None:
        """Count a hit for an image found outside the cache: one an earlier request of the same prefill encodes."""
        with self._lock:
            self.hits += 1

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int]:
        """The bound, what is held, and the counters, read together."""
        with self._lock:
            return {"max_bytes": self.max_bytes, "entries": len(self._entries), "bytes": self._bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class CachedImageEncoder:
    """Builds a request's image prefill from the cache, encoding only the images it does not hold."""

    def __init__(self, loaded: LoadedModel, cache: ImageFeatureCache) -> None:
        if not loaded.takes_images:
            raise ValueError(f"{loaded.name} is a text-only model; it has no images to cache")
        self.loaded, self.cache = loaded, cache

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[tuple[str, ImagePlan]]]) -> dict[str, Any]:
        """Forward keywords for the images of prompts prefilled together, each prompt's given as (plan_key, plan)
        in placeholder order, the prompts in row order: image_embeds, one (T_i, C) tensor per placeholder run
        (row-major, as scatter_rows fills them), and each position input (images, ...).

        The distinct images the cache lacks, of all the prompts, go through the vision side in one
        encode_images call and are kept. Raises ValueError when the plans do not fit the model (as forward
        would)."""
        found: dict[str, EncodedImage] = {}
        missing: dict[str, ImagePlan] = {}  # key -> plan, in first-shown order
        for images in prompts:
            for key, plan in dict(images).items():  # each distinct image of the prompt once
                if key in missing:  # an earlier prompt of this prefill has it encoded below
                    self.cache.count_hit()
                    continue
                entry = self.cache.get(key)
                if entry is None:
                    missing[key] = plan
                else:
                    found[key] = entry
        if missing:
            for key, entry in zip(missing, self.loaded.encode(list(missing.values()))):
                self.cache.put(key, entry)
                found[key] = entry
        return self.loaded.encoded_prefill([found[key] for images in prompts for key, _ in images])
