"""Build the qwen_vl_chat fixtures (tests/fixtures/qwen_vl_chat/) with Qwen-VL-Chat's own remote code.

Upstream code: the Hub repository's files modeling_qwen.py, configuration_qwen.py, visual.py,
qwen_generation_utils.py and tokenization_qwen.py as mirrored on GitHub by x1ngzai/Qwen-VL-Chat-Int4,
commit 1cd721a27dd000fc4cf688c6ad58e614da1d600d (the Hub files of Qwen/Qwen-VL-Chat-Int4; their python
files are Qwen-VL-Chat's, the GPTQ weights are not used here). Its requirements.txt asks for transformers
4.32.0. Environment (torch 2.13 CPU and tiktoken 0.14.0 / numpy / Pillow / scikit-image of vlmkit's venv,
reached through a .pth file; the venv's own packages come first):

    python3 -m venv /work/refenv/qwenvl
    echo /work/main/.venv/lib/python3.11/site-packages > /work/refenv/qwenvl/lib/python3.11/site-packages/main.pth
    /work/refenv/qwenvl/bin/pip install --no-deps transformers==4.32.0 tokenizers==0.13.3 einops==0.8.1 \
        transformers_stream_generator==0.0.4 torchvision==0.28.0 huggingface_hub==0.24.7
    /work/refenv/qwenvl/bin/python tests/reference/qwen_vl_chat.py /path/to/the/reference/files

and, to check that the reference loads what vlmkit's save_pretrained writes (same logits):

    PYTHONPATH=src python -c "from vlmkit.load import load_model; \
        load_model('tests/fixtures/qwen_vl_chat/tiny').save_pretrained('/tmp/qwenvl/saved')"
    /work/refenv/qwenvl/bin/python tests/reference/qwen_vl_chat.py /path/to/the/reference/files \
        --check-saved /tmp/qwenvl/saved

PyPI's torchvision wheel is a CUDA build whose compiled ops cannot load beside a CPU torch; visual.py only
uses torchvision's pure-Python PIL transforms (Resize, ToTensor, Normalize), so the script skips
torchvision's meta-kernel registration module (stubbed in sys.modules).

The real config.json (tests/fixtures/qwen_vl_chat/real/) is the mirror's (Qwen-VL-Chat-Int4's) without its
quantization_config, with fp16 false and torch_dtype bfloat16: Qwen-VL-Chat's values, as a second copy found by
search (a third-party script transcribing Qwen-VL-Chat's config.json) also gives them; generation_config.json
is the mirror's. The tiny checkpoint is that config.json with small dimensions: a 2-layer, 32-wide Qwen-1 LM and a
2-layer, 16-wide ViT at the real 448 px / patch 14 (32 x 32 patches, so the 16 x 16 position table is
resized as in the real model) with its 256-query resampler. fp32 is set (the reference would pick bf16 or
fp16 on a GPU). One size the reference hard-codes is overridden, and the override is recorded:
- the resampler has output_dim // 128 heads, 0 at the tiny width 32: visual.py's
  `num_heads=output_dim // 128` is rewritten to `num_heads=max(1, output_dim // 128)` (the only source edit,
  the same for every released size; the script checks it finds exactly one occurrence), vlmkit's rule.
The tiny tokenizer is tests/fixtures/qwen_tiktoken/qwen.tiktoken (part 1's small rank file in Qwen's format)
cut to its first KEEP_RANKS ranks, so the special tokens (<|endoftext|> .. <imgpad>) follow at KEEP_RANKS;
config.json's vocab_size pads it to a multiple of 16 as the real 151936 pads 151851, and
visual.image_start_id is the tiny vocabulary's <img>.

Outputs (tests/fixtures/qwen_vl_chat/):
    tiny/            config.json, generation_config.json (the real one, its eos / pad ids renumbered),
                     model.safetensors, qwen.tiktoken, tokenizer_config.json
    reference.safetensors  input_ids of make_context for the two-photo query (the photos' paths in the image
                     spans), logits at logit_rows (every 16th position and the last 32), 20 greedy ids, the last
                     8 logit rows of a text-only question, and per photo the preprocessed pixels at every 11th
                     row and column
    reference.json   query and prompt texts, make_context ids for the same query with empty image paths (what
                     vlmkit's prompt writes), for a multi-turn history and for a text-only question, per-photo
                     pixel sums
    real/            (input, not written) Qwen-VL-Chat's config.json and generation_config.json, also what
                     `vlmkit inspect` reads in the tests
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

from shared import check_fixture_logits, parse_args, photos

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "qwen_vl_chat"
SMALL_VOCAB = ROOT / "tests" / "fixtures" / "qwen_tiktoken"
KEEP_RANKS = 300
# the photos processed (shared.PHOTOS: scikit-image's data, of different sizes and aspect ratios)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble", "astronaut_tall")
SEED = 7
TINY_LM = {"hidden_size": 32, "num_attention_heads": 4, "kv_channels": 8, "intermediate_size": 64,
           "num_hidden_layers": 2}
TINY_VISUAL = {"width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "output_dim": 32}
HEADS_EDIT = ("num_heads=output_dim // 128", "num_heads=max(1, output_dim // 128)")
QUESTION = "What do the two photos show?"
PROMPT_PHOTOS = ("astronaut", "coffee")


def import_reference(src: Path, work: Path) -> types.ModuleType:
    """The reference files as a package `qwenvl_ref` under work/, with the one edit of visual.py."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    pkg = work / "qwenvl_ref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("configuration_qwen", "modeling_qwen", "visual", "qwen_generation_utils", "tokenization_qwen"):
        text = (src / f"{name}.py").read_text()
        if name == "visual":
            if text.count(HEADS_EDIT[0]) != 1:
                raise SystemExit(f"expected one '{HEADS_EDIT[0]}' in visual.py, found {text.count(HEADS_EDIT[0])}")
            text = text.replace(*HEADS_EDIT)
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(work))
    return importlib.import_module("qwenvl_ref")


def tiny_tokenizer(out: Path) -> int:
    """Write out/qwen.tiktoken (the first KEEP_RANKS ranks) and tokenizer_config.json; returns the vocab size."""
    lines = (SMALL_VOCAB / "qwen.tiktoken").read_text().splitlines(keepends=True)[:KEEP_RANKS]
    (out / "qwen.tiktoken").write_text("".join(lines))
    shutil.copy(SMALL_VOCAB / "tokenizer_config.json", out / "tokenizer_config.json")
    return KEEP_RANKS + 3 + 205 + 9  # ranks, <|endoftext|> <|im_start|> <|im_end|>, extras, Qwen-VL's tags


def tiny_config(real: dict, tokens: int, image_start_id: int) -> dict:
    """The real config.json with small dimensions (see the module docstring)."""
    cfg = json.loads(json.dumps(real))
    cfg.update(TINY_LM, vocab_size=-(-tokens // 16) * 16, fp32=True, bf16=False, fp16=False, use_flash_attn=False,
               torch_dtype="float32")
    cfg["visual"] = {**real["visual"], **TINY_VISUAL, "image_start_id": image_start_id}
    return cfg


def randomize(model: torch.nn.Module) -> None:
    """Weights of unit-scale activations (the reference's init leaves norms at 1, biases at 0 and most weights
    at std 0.02, which would make every logit alike); the resampler's sin-cos pos_embed is kept."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn_pool.pos_embed"):
                continue
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def make_ids(tokenizer, make_context, query: str, history=None) -> list[int]:
    _, ids = make_context(tokenizer, query, history=history or [], system="You are a helpful assistant.",
                          max_window_size=6144, chat_format="chatml")
    return ids


def check_saved(folder: Path, ref) -> None:
    """Load a saved tiny model with the reference (strict: every tensor name and shape must match) and its
    tokenizer from the saved qwen.tiktoken, and compare its logits on the fixture prompt."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = ref.modeling_qwen.QWenLMHeadModel(ref.configuration_qwen.QWenConfig(
        **{k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")})).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    tokenizer = ref.tokenization_qwen.QWenTokenizer(str(folder / "qwen.tiktoken"))
    report = json.loads((OUT / "reference.json").read_text())
    want = load_file(str(OUT / "reference.safetensors"))
    ids = make_ids(tokenizer, ref.qwen_generation_utils.make_context, report["query"])
    if ids != want["input_ids"].tolist():
        raise SystemExit("the saved folder's tokenizer gives other input ids than the fixture's")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, want["logit_rows"]]
    check_fixture_logits(folder, logits, want["logits"])
    import transformers  # model.chat reads chat_format, max_window_size and the stop ids in generation_config.json

    model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    response, _ = model.chat(tokenizer, report["query"], history=None, do_sample=False, max_new_tokens=20)
    print(f"{folder}: the reference's model.chat with the saved generation_config.json answers {response!r}")


def main() -> None:
    args = parse_args(__doc__, "folder with the reference .py files")
    src = args.reference.resolve()
    check = args.check_saved.resolve() if args.check_saved is not None else None
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qwenvl-ref-"))
    ref = import_reference(src, work)
    for name in ("configuration_qwen", "modeling_qwen", "visual", "qwen_generation_utils", "tokenization_qwen"):
        setattr(ref, name, importlib.import_module(f"qwenvl_ref.{name}"))
    import transformers
    from safetensors.torch import save_file

    print(f"transformers {transformers.__version__}, reference {ref.__name__} from {src}")
    pics = photos(*PHOTOS)
    os.chdir(work)  # the reference opens the images by the paths written in the prompt
    for name in PROMPT_PHOTOS:
        pics[name].save(f"{name}.png")  # PNG: the same pixels back
    if check is not None:
        check_saved(check, ref)
        return
    tiny = OUT / "tiny"
    if tiny.exists():
        shutil.rmtree(tiny)
    tiny.mkdir(parents=True)
    tokens = tiny_tokenizer(tiny)
    tokenizer = ref.tokenization_qwen.QWenTokenizer(str(tiny / "qwen.tiktoken"))
    if len(tokenizer) != tokens:
        raise SystemExit(f"the tiny tokenizer has {len(tokenizer)} tokens, expected {tokens}")
    real = json.loads((OUT / "real" / "config.json").read_text())
    config = tiny_config(real, tokens, tokenizer.img_start_id)
    (tiny / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = json.loads((OUT / "real" / "generation_config.json").read_text())
    generation.update(eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.eod_id)  # <|endoftext|>, renumbered
    (tiny / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    model = ref.modeling_qwen.QWenLMHeadModel(ref.configuration_qwen.QWenConfig(
        **{k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")})).eval()
    randomize(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tiny / "model.safetensors"),
              metadata={"format": "pt"})

    make_context = ref.qwen_generation_utils.make_context
    query = tokenizer.from_list_format([{"image": f"{n}.png"} for n in PROMPT_PHOTOS] + [{"text": QUESTION}])
    ids = make_ids(tokenizer, make_context, query)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids, generation_config=transformers.GenerationConfig(
            max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eod_id))
    greedy = generated[0, input_ids.shape[1]:]
    rows = torch.cat([torch.arange(0, input_ids.shape[1] - 32, 16), torch.arange(input_ids.shape[1] - 32,
                                                                                  input_ids.shape[1])])
    tensors = {"input_ids": input_ids[0], "logit_rows": rows, "logits": logits[0, rows], "greedy_ids": greedy}
    text_only = make_ids(tokenizer, make_context, "Hello there")
    with torch.no_grad():  # no <img> in the prompt: the LM alone, what a text-only Qwen-1 checkpoint runs
        tensors["text_only_logits"] = model(torch.tensor([text_only])).logits[0, -8:]
    no_paths = tokenizer.from_list_format([{"image": ""} for _ in PROMPT_PHOTOS] + [{"text": QUESTION}])
    history = [(tokenizer.from_list_format([{"image": ""}, {"text": "What is this?"}]), "An astronaut."),
               (tokenizer.from_list_format([{"text": "And the cup?"}]), "Coffee.")]
    second = tokenizer.from_list_format([{"image": ""}, {"image": ""}, {"text": "And these?"}])
    report = {
        "transformers": transformers.__version__,
        "query": query,
        "prompt": make_context(tokenizer, query, history=[], system="You are a helpful assistant.",
                               max_window_size=6144, chat_format="chatml")[0],
        "prompt_photos": list(PROMPT_PHOTOS),
        "no_path_ids": make_ids(tokenizer, make_context, no_paths),
        "multi_turn": {"history": history, "query": second,
                       "ids": make_ids(tokenizer, make_context, second, history)},
        "text_only_ids": text_only,
        "stop_ids": [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id],
        "photos": {},
    }
    visual = model.transformer.visual
    for name, image in pics.items():
        pixels = visual.image_transform(image.convert("RGB"))  # (3, 448, 448)
        report["photos"][name] = {"size": list(image.size), "mode": image.mode,
                                  "sum": pixels.double().sum().item(), "abs_sum": pixels.double().abs().sum().item()}
        tensors[f"sample.{name}"] = pixels[:, ::11, ::11].contiguous()  # (3, 41, 41)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"prompt tokens {input_ids.shape[1]}, greedy {greedy.tolist()}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
