"""Build the phi3_v fixtures (tests/fixtures/phi3_v/) with Phi-3(.5)-vision's own remote code.

Upstream code: the Hub repository's files modeling_phi3_v.py, configuration_phi3_v.py,
image_embedding_phi3_v.py, image_processing_phi3_v.py, processing_phi3_v.py, tokenizer.json and
tokenizer_config.json as mirrored on GitHub by
Aritra02091998/Phi-3-vision-128k-instruct-Improvised-for-QLORA-Training, commit
16e16b08556652bc108b7c5d7e3ce94881148246 (the Hub files; the mirror's own edits touch only the
flash-attention paths, which this CPU run never takes; image_processing_phi3_v.py and
processing_phi3_v.py equal lamm-mit/Cephalo-Phi-3-Vision-MoE's copies but for parentheses).
Environment: transformers 4.43.0, tokenizers 0.19.1, torchvision 0.28.0 on torch 2.13 (CPU):

    python -m venv --system-site-packages /work/venvs/phi3v
    /work/venvs/phi3v/bin/pip install --no-deps transformers==4.43.0 tokenizers==0.19.1 \
        huggingface_hub==0.24.7 torchvision==0.28.0
    /work/venvs/phi3v/bin/python tests/reference/phi3_v.py /path/to/reference/files

and, to check that the reference loads what vlmkit's save_pretrained writes (same logits):

    PYTHONPATH=src python -c "from vlmkit.load import load_model; \
        load_model('tests/fixtures/phi3_v/tiny').save_pretrained('/tmp/phi3v/saved')"
    /work/venvs/phi3v/bin/python tests/reference/phi3_v.py /path/to/reference/files --check-saved /tmp/phi3v/saved

PyPI's torchvision wheel is a CUDA build whose compiled ops cannot load beside a CPU torch; the
reference only uses torchvision's pure-Python PIL transforms (resize, pad, ToTensor, Normalize), so
the script skips torchvision's meta-kernel registration module (stubbed in sys.modules).

The tiny checkpoint is the real config.json (tests/fixtures/phi3_v/real/config.json: the values of
microsoft/Phi-3.5-vision-instruct's config.json, as transcribed in sdpython/onnx-diagnostic's
untrained-model helpers; phi3_v, HD transform, longrope "su") with small dimensions, and the real
preprocessor_config.json (real/, Phi-3.5-vision's num_crops 4). Two sizes the reference hard-codes are overridden, and the override is recorded in the
fixture's config so vlmkit reads it like any other size:
- the CLIP tower: image_embedding_phi3_v builds it from the constant CLIP_VIT_LARGE_PATCH14_336_CONFIG;
  here that constant is replaced by a 3-layer, 16-wide CLIP at 336 px / patch 14 (the same 24 x 24
  patches), written to config.json as img_processor["vision_config"];
- reshape_hd_patches_2x2merge asserts C == 1024 (the ViT-L width): the assert is rewritten to the tiny
  width (the only source edit; the script checks it finds exactly one occurrence).
The image placeholder id (`<|image|>`, 32044 in the real vocabulary) is config["image_token_id"] and the
pad id (Phi3VConfig's default 32000, <|endoftext|>) config["pad_token_id"], since the tiny vocabulary
renumbers them; the reference ignores image_token_id (it fills the processor's negative ids).

The tiny tokenizer is the real tokenizer.json cut to its first 600 entries (ids 0-599, with the merges
among them) and the 64 added tokens of the real vocabulary (<|endoftext|> ... <|image|>) renumbered to
600-663, so special tokens keep their order and the vocabulary is 664 (the real 32064 = 32000 + 64).

Outputs (tests/fixtures/phi3_v/):
    tiny/            config.json, model.safetensors, preprocessor_config.json, tokenizer files
    reference.safetensors  input_ids (images as -1/-2), logits of the two-photo prompt (every 16th position
                     and the last 32: logit_rows), 20 greedy ids, the processor's image_sizes, and per
                     photo its views at every 7th pixel row and column
    reference.json   prompt text, token counts, image_sizes, per-view sums, real-size token counts
    real/            (input, not written) Phi-3.5-vision-instruct's config.json and preprocessor_config.json,
                     also what `vlmkit inspect` reads in the tests
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared import check_fixture_logits, parse_args, photos

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "phi3_v"
KEEP_VOCAB = 600
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=16)
NUM_CROPS = 4
# the photos processed (shared.PHOTOS: scikit-image's data, of different sizes and aspect ratios)
PHOTOS = ("astronaut", "chelsea", "rocket", "camera", "hubble", "coffee_strip", "astronaut_tall")
SEED = 1


def import_reference(src: Path, work: Path) -> types.ModuleType:
    """The reference files as a package `phi3v_ref` under work/, with the one assert rewritten."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    pkg = work / "phi3v_ref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("configuration_phi3_v", "modeling_phi3_v", "image_embedding_phi3_v", "image_processing_phi3_v",
                 "processing_phi3_v"):
        text = (src / f"{name}.py").read_text()
        if name == "image_embedding_phi3_v":
            old = "C == 1024"
            if text.count(old) != 1:
                raise SystemExit(f"expected one '{old}' in image_embedding_phi3_v.py, found {text.count(old)}")
            text = text.replace(old, f"C == {TINY_CLIP['hidden_size']}")
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(work))
    emb = importlib.import_module("phi3v_ref.image_embedding_phi3_v")
    from transformers import CLIPVisionConfig

    emb.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(attention_dropout=0.0, dropout=0.0,
                                                             initializer_factor=1.0, initializer_range=0.02,
                                                             num_channels=3, **TINY_CLIP)
    return importlib.import_module("phi3v_ref")


def tiny_tokenizer(src: Path, out: Path) -> int:
    """Write out/tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns the vocab size."""
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < KEEP_VOCAB}
    merges = []
    for m in tok["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    tok["model"]["vocab"], tok["model"]["merges"] = vocab, merges
    renumber = {}
    added = []
    for t in tok["added_tokens"]:
        if t["id"] >= 32000:
            renumber[t["id"]] = KEEP_VOCAB + t["id"] - 32000
            t = {**t, "id": renumber[t["id"]]}
        added.append(t)
    tok["added_tokens"] = added
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(renumber.get(int(k), int(k))): v
                                      for k, v in config["added_tokens_decoder"].items()}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if (src / "special_tokens_map.json").is_file():
        shutil.copy(src / "special_tokens_map.json", out / "special_tokens_map.json")
    return KEEP_VOCAB + 64


def tiny_config(real: dict, vocab_size: int) -> dict:
    """The real config.json with small dimensions (see the module docstring)."""
    cfg = json.loads(json.dumps(real))
    cfg.pop("_attn_implementation", None)
    head_dim = 8
    half = head_dim // 2
    pick = np.linspace(0, len(real["rope_scaling"]["short_factor"]) - 1, half).round().astype(int)
    cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
               num_hidden_layers=2, vocab_size=vocab_size, image_token_id=KEEP_VOCAB + 44,
               pad_token_id=KEEP_VOCAB,  # Phi3VConfig's default 32000 (<|endoftext|>), renumbered
               torch_dtype="float32", initializer_range=0.2)
    cfg["rope_scaling"] = {"long_factor": [real["rope_scaling"]["long_factor"][i] for i in pick],
                           "short_factor": [real["rope_scaling"]["short_factor"][i] for i in pick],
                           "type": real["rope_scaling"]["type"]}
    cfg["img_processor"] = {**real["img_processor"], "image_dim_out": TINY_CLIP["hidden_size"],
                            "vision_config": {**TINY_CLIP}}
    return cfg


def check_saved(folder: Path, config_class, model_class, image_processor_class, processor_class) -> None:
    """Load a saved tiny model with the reference (strict: every tensor name and shape must match) and its
    image processor from the saved preprocessor_config.json, and compare its logits on the fixture prompt."""
    import transformers
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = model_class(config_class(**{k: v for k, v in config.items()
                                        if k not in ("auto_map", "architectures", "model_type")},
                                     attn_implementation="eager")).eval()
    state = load_file(str(folder / "model.safetensors"))
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    image_processor = image_processor_class(num_crops=pre["num_crops"], image_mean=pre["image_mean"],
                                            image_std=pre["image_std"])
    image_processor.num_img_tokens = pre["num_img_tokens"]
    # the fixture's tokenizer files: vlmkit's tokenizers (0.23) writes tokenizer.json in a form 0.19 cannot read
    processor = processor_class(image_processor, transformers.AutoTokenizer.from_pretrained(str(OUT / "tiny")))
    report = json.loads((OUT / "reference.json").read_text())
    pics = photos(*PHOTOS)
    inputs = processor(report["prompt"], [pics[n] for n in report["prompt_images"]], return_tensors="pt")
    from safetensors.torch import load_file as load

    want = load(str(OUT / "reference.safetensors"))
    if not torch.equal(inputs["input_ids"][0], want["input_ids"]):
        raise SystemExit("the saved folder's tokenizer/processor gives other input ids than the fixture's")
    with torch.no_grad():
        logits = model(**inputs).logits[0, want["logit_rows"]]
    check_fixture_logits(folder, logits, want["logits"])


def main() -> None:
    args = parse_args(__doc__, "folder with the reference .py files, tokenizer.json and tokenizer_config.json")
    src = args.reference.resolve()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="phi3v-ref-"))
    ref = import_reference(src, work)
    import transformers
    from phi3v_ref.configuration_phi3_v import Phi3VConfig
    from phi3v_ref.image_processing_phi3_v import Phi3VImageProcessor
    from phi3v_ref.modeling_phi3_v import Phi3VForCausalLM
    from phi3v_ref.processing_phi3_v import Phi3VProcessor
    from safetensors.torch import save_file

    print(f"transformers {transformers.__version__}, reference {ref.__name__} from {src}")
    if args.check_saved is not None:
        check_saved(args.check_saved, Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor)
        return
    tiny = OUT / "tiny"
    if tiny.exists():
        shutil.rmtree(tiny)
    tiny.mkdir(parents=True)
    vocab_size = tiny_tokenizer(src, tiny)
    real = json.loads((OUT / "real" / "config.json").read_text())
    config = tiny_config(real, vocab_size)
    (tiny / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = json.loads((OUT / "real" / "preprocessor_config.json").read_text())
    preprocessor["num_crops"] = NUM_CROPS
    (tiny / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))

    model = Phi3VForCausalLM(Phi3VConfig(**{k: v for k, v in config.items()
                                            if k not in ("auto_map", "architectures", "model_type")},
                                         attn_implementation="eager")).eval()
    with torch.no_grad():  # learned vectors start at zero in the reference; make them matter
        emb = model.model.vision_embed_tokens
        emb.glb_GN.normal_(0, 1)
        emb.sub_GN.normal_(0, 1)
    # vision_embed_tokens.wte is embed_tokens itself; the released checkpoints store it once
    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".vision_embed_tokens.wte." not in k}
    save_file(state, str(tiny / "model.safetensors"), metadata={"format": "pt"})

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny))
    image_processor = Phi3VImageProcessor(num_crops=NUM_CROPS, image_mean=preprocessor["image_mean"],
                                          image_std=preprocessor["image_std"])
    image_processor.num_img_tokens = preprocessor["num_img_tokens"]
    processor = Phi3VProcessor(image_processor, tokenizer)

    pics = photos(*PHOTOS)
    messages = [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nWhat do the two photos show?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    two = [pics["astronaut"], pics["coffee_strip"]]
    inputs = processor(prompt, two, return_tensors="pt")
    input_ids = inputs["input_ids"].clone()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"].clone(), pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], attention_mask=inputs["attention_mask"]).logits
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        generated = model.generate(input_ids=inputs["input_ids"].clone(), pixel_values=inputs["pixel_values"],
                                   image_sizes=inputs["image_sizes"], attention_mask=inputs["attention_mask"],
                                   max_new_tokens=20, do_sample=False, eos_token_id=None)
    greedy = generated[0, input_ids.shape[1]:]
    multi_turn = [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "<|image_1|>\nWhat is this?"},
                  {"role": "assistant", "content": "An astronaut."},
                  {"role": "user", "content": "<|image_2|>\nAnd this?"}]
    rows = torch.cat([torch.arange(0, input_ids.shape[1] - 32, 16), torch.arange(input_ids.shape[1] - 32,
                                                                                  input_ids.shape[1])])
    tensors = {"input_ids": input_ids[0], "logit_rows": rows, "logits": logits[0, rows], "greedy_ids": greedy,
               "image_sizes": inputs["image_sizes"]}
    report = {
        "transformers": transformers.__version__,
        "num_crops": NUM_CROPS,
        "prompt": prompt,
        "prompt_multi_turn": tokenizer.apply_chat_template(multi_turn, tokenize=False, add_generation_prompt=True),
        "prompt_images": ["astronaut", "coffee_strip"],
        "multi_turn_ids": processor(tokenizer.apply_chat_template(multi_turn, tokenize=False,
                                                                  add_generation_prompt=True),
                                    two, return_tensors="pt")["input_ids"][0].tolist(),
        "text_only_ids": processor(tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                                                 tokenize=False, add_generation_prompt=True),
                                   None, return_tensors="pt")["input_ids"][0].tolist(),
        "photos": {},
        "real_sizes": {},
    }
    for name, image in pics.items():
        out = image_processor(image, return_tensors="pt")
        h, w = out["image_sizes"][0].tolist()
        views = out["pixel_values"][0][: 1 + (h // 336) * (w // 336)]  # (1 + crops, 3, 336, 336)
        report["photos"][name] = {
            "size": list(image.size), "mode": image.mode, "image_sizes": [h, w],
            "num_img_tokens": int(out["num_img_tokens"][0]),
            "num_img_tokens_hd16": Phi3VImageProcessor(num_crops=16).calc_num_image_tokens(image)[0],
            "view_sums": views.double().sum(dim=(1, 2, 3)).tolist(),
            "view_abs_sums": views.double().abs().sum(dim=(1, 2, 3)).tolist(),
        }
        tensors[f"sample.{name}"] = views[:, :, ::7, ::7].contiguous()  # (V, 3, 48, 48)
    for n in (1, 4, 16):
        proc = Phi3VImageProcessor(num_crops=n)
        report["real_sizes"][str(n)] = {f"{s}x{s}": proc.calc_num_image_tokens(Image.new("RGB", (s, s)))[0]
                                        for s in (336, 672, 1344)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"prompt tokens {input_ids.shape[1]}, greedy {greedy.tolist()}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
