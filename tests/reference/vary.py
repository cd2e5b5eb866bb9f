"""Build the vary fixtures (tests/fixtures/vary/) with Vary's own code.

Upstream code: GitHub Ucas-HaoranWei/Vary-toy, commit c6e405977aa6e88d4807a6b79f394299623fc6f3, folder
Vary-master/ (its vary/model/vary_toy_qwen1_8.py is the released Vary-toy's model; vary/model/vary_qwen_vary.py,
the same file in Ucas-HaoranWei/Vary at 9d06a14274e4f6e5d3eaa4f9a5f5b79431d090e9 byte for byte, is Vary-base's;
both repositories share vision_encoder/sam.py, llm/qwen/*.py, plug/*.py and utils/conversation.py byte for
byte). Both model files name their modules alike (transformer.vision_tower = CLIP-L, transformer.vision_tower_high
= SAM-B with net_2/net_3, transformer.mm_projector / mm_projector_vary, the Qwen-1 LM); they differ in the
projector widths (Vary-toy Linear(1024, 1024) beside Qwen-1.8B, Vary-base Linear(1024, 2048) beside Qwen-7B),
in the SAM branch's image processor (Vary-toy's demo: plug/blip_process.BlipImageEvalProcessor(1024), a
torchvision bicubic resize and CLIP's mean/std; Vary-base's demo: plug/transforms.test_transform, albumentations'
cv2 bilinear resize and ImageNet's mean/std) and in the demo prompt (Vary-toy writes "\\n" after `</img>`).
The tiny model runs in vary_toy_qwen1_8.py and, its tensors unchanged, in vary_qwen_vary.py with Vary-base's
processor and prompt; the processor fixtures hold both SAM processors.

Environment (torch 2.13.0+cpu, transformers 4.32.1 as Vary's pyproject.toml pins, tokenizers 0.13.3,
tiktoken 0.14.0, einops, scikit-image 0.26.0, torchvision 0.28.0 and timm 0.6.13 without deps, albumentations
1.3.1, opencv-python-headless 5.1.0.95):

    python3 -m venv /work/refenv/vary
    /work/refenv/vary/bin/pip install torch==2.13.0
    /work/refenv/vary/bin/pip install transformers==4.32.1 tiktoken einops scikit-image
    /work/refenv/vary/bin/pip install --no-deps torchvision==0.28.0 timm==0.6.13
    /work/refenv/vary/bin/pip install albumentations==1.3.1 opencv-python-headless
    /work/refenv/vary/bin/python tests/reference/vary.py /path/to/Vary-toy/Vary-master

and, to check that the reference loads what vlmkit's save_pretrained writes (same logits):

    PYTHONPATH=src python -c "from vlmkit.load import load_model; \\
        load_model('tests/fixtures/vary/tiny').save_pretrained('/tmp/vary-saved')"
    /work/refenv/vary/bin/python tests/reference/vary.py /path/to/Vary-toy/Vary-master --check-saved /tmp/vary-saved

PyPI's torchvision wheel is a CUDA build whose compiled ops cannot load beside a CPU torch; the reference uses
only its PIL transforms, so the script stubs torchvision's meta-kernel registration module.

What the reference hard-codes and the tiny model overrides (each override is recorded in the fixture's
config.json, so vlmkit reads it like any other size):
- the CLIP tower: `CLIPVisionModel.from_pretrained('/data/.../vit-large-patch14/')` (openai/clip-vit-large-patch14)
  is replaced in the module by a CLIPVisionModel built from TINY_CLIP (224 px, patch 14: the same 16 x 16 = 256
  patches), written to config.json as "vision_config";
- SAM-B: `build_sam_vit_b()` is replaced by sam.py's own `_build_sam` with TINY_SAM's width / depth / heads /
  global layers, and sam.py's hard-coded channels (prompt_embed_dim 256, net_2 256 -> 512, net_3 512 -> 1024)
  are rewritten to TINY_SAM's (config.json "sam_config"); the input stays 1024 px (64 x 64 -> 16 x 16 = 256);
- the projectors `nn.Linear(1024, 1024)` and the dummy features `torch.zeros(256, 1024)` are rewritten to the
  tiny widths, and the ids `<img>` 151857, `</img>` 151858, `<imgpad>` 151859 to the tiny vocabulary's;
- the tokenizer: Vary's llm/qwen/tokenization_qwen.py (Qwen-7B's, without image tags) with Qwen-VL's image tags
  appended to its SPECIAL_TOKENS, which is where the model code's ids 151851.. 151859 put them; the rank file is
  tests/fixtures/qwen_tiktoken/qwen.tiktoken (628 ranks: `<img>` = 628 + 3 + 205 + 6 = 842).
Every source rewrite is a text replacement whose number of occurrences the script checks.

Outputs (tests/fixtures/vary/):
    tiny/                  config.json, generation_config.json, model.safetensors, qwen.tiktoken,
                           tokenizer_config.json
    reference.safetensors  input_ids of the two-photo prompt, its logits (rows logit_rows), 20 greedy ids, the last 8
                           logit rows of the text-only prompt (text_only_logits), and per
                           photo every 14th pixel of the CLIP view and every 64th of both SAM views
    reference.json         prompts, ids, view sums per photo
    reference_base.safetensors  the same tiny tensors run by Vary-base's vary_qwen_vary.py with its demo's prompt
                           and SAM processor (test_transform): input_ids, logits (rows logit_rows), 20 greedy ids
    real/config.json       (input, not written) Vary-base's config as its code builds it: QWenConfig's Qwen-7B
                           sizes (configuration_qwen.py defaults, vocab 151936) and the keys vary_qwen_vary.py and the
                           README's training command set (vision_select_layer -2, image_token_len 256, im_* ids);
                           no Vary-base config.json is published. Read by `vlmkit inspect` in the tests
    real_toy/config.json   (input, not written) the same with Qwen-1.8B's sizes (2048 wide, 24 layers, 16 heads,
                           intermediate_size 11008), the released Vary-toy's language model
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from PIL import Image

from phi3_v import PHOTOS  # the seven photos of tests/reference/phi3_v.py
from shared import check_fixture_logits, parse_args, photos

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "vary"
RANKS = ROOT / "tests" / "fixtures" / "qwen_tiktoken" / "qwen.tiktoken"
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=224,
                 patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)
TINY_SAM = dict(hidden_size=8, num_layers=2, num_heads=2, global_attn_indexes=[1], output_channels=8,
                downsample_channels=[8, 16])
HALF = 16  # each projector's output: the LM is 2 * HALF wide
# openai/clip-vit-large-patch14's preprocessor_config.json, which the reference loads with the tower
CLIP_PREPROCESSOR = dict(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3, size=224,
                         image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
REAL_IDS = {"<img>": 151857, "</img>": 151858, "<imgpad>": 151859}
TOKENS = 256
QUESTION = "What do the two photos show?"
SEED = 3


def _replace(text: str, old: str, new: str, count: int | None, name: str) -> str:
    found = text.count(old)
    if (count is None and found == 0) or (count is not None and found != count):
        raise SystemExit(f"expected {count or 'some'} '{old}' in {name}, found {found}")
    return text.replace(old, new)


def import_reference(src: Path, work: Path, vocab: int) -> types.SimpleNamespace:
    """Vary's package copied to work/vary with the rewrites of the module docstring, imported."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    shutil.copytree(src / "vary", work / "vary")
    ids = {tag: vocab + 3 + 205 + IMAGE_TAGS.index(tag) for tag in REAL_IDS}
    sam = work / "vary" / "model" / "vision_encoder" / "sam.py"
    text = sam.read_text()
    text = _replace(text, "prompt_embed_dim = 256", f"prompt_embed_dim = {TINY_SAM['output_channels']}", 1, sam.name)
    c2, c3 = TINY_SAM["downsample_channels"]
    text = _replace(text, "nn.Conv2d(256, 512,", f"nn.Conv2d({TINY_SAM['output_channels']}, {c2},", 1, sam.name)
    text = _replace(text, "nn.Conv2d(512, 1024,", f"nn.Conv2d({c2}, {c3},", 1, sam.name)
    sam.write_text(text)
    for name, width in (("vary_toy_qwen1_8", 1024), ("vary_qwen_vary", 2048)):
        model_file = work / "vary" / "model" / f"{name}.py"
        text = model_file.read_text()
        text = _replace(text, f"nn.Linear(1024, {width})", f"nn.Linear({TINY_CLIP['hidden_size']}, {HALF})", 2,
                        model_file.name)
        text = _replace(text, "torch.zeros(256, 1024,", f"torch.zeros(256, {TINY_CLIP['hidden_size']},", 2,
                        model_file.name)
        for tag, real in REAL_IDS.items():
            text = _replace(text, str(real), str(ids[tag]), None, model_file.name)
        if name == "vary_qwen_vary":  # both files register "vary" with transformers' Auto classes: once is allowed
            text = _replace(text, 'AutoConfig.register("vary", varyConfig)', "", 1, model_file.name)
            text = _replace(text, "AutoModelForCausalLM.register(varyConfig, varyQwenForCausalLM)", "", 1,
                            model_file.name)
        model_file.write_text(text)
    # vary/model/__init__.py imports the OPT models too; the Qwen ones are all this script needs
    (work / "vary" / "model" / "__init__.py").write_text("")
    sys.path.insert(0, str(work))
    modeling = importlib.import_module("vary.model.vary_toy_qwen1_8")
    modeling_base = importlib.import_module("vary.model.vary_qwen_vary")
    sam_module = importlib.import_module("vary.model.vision_encoder.sam")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class TinyClip:
        @staticmethod
        def from_pretrained(path: str) -> CLIPVisionModel:
            return CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))

    for module in (modeling, modeling_base):
        module.CLIPVisionModel = TinyClip
        module.build_sam_vit_b = lambda: sam_module._build_sam(
            encoder_embed_dim=TINY_SAM["hidden_size"], encoder_depth=TINY_SAM["num_layers"],
            encoder_num_heads=TINY_SAM["num_heads"], encoder_global_attn_indexes=TINY_SAM["global_attn_indexes"])
    tokenization = importlib.import_module("vary.model.llm.qwen.tokenization_qwen")
    tokenization.SPECIAL_TOKENS = tokenization.SPECIAL_TOKENS + IMAGE_TAGS
    return types.SimpleNamespace(modeling=modeling, modeling_base=modeling_base, tokenization=tokenization, ids=ids,
                                 conversation=importlib.import_module("vary.utils.conversation"),
                                 blip=importlib.import_module("vary.model.plug.blip_process"),
                                 transforms=importlib.import_module("vary.model.plug.transforms"))


def tiny_config(vocab_size: int, ids: dict[str, int]) -> dict:
    """A Vary-toy config.json (the keys varyConfig / QWenConfig and the model code read) with small sizes."""
    return {
        "architectures": ["varyQwenForCausalLM"], "model_type": "vary",
        "vocab_size": vocab_size, "hidden_size": 2 * HALF, "num_hidden_layers": 2, "num_attention_heads": 4,
        "kv_channels": 8, "intermediate_size": 64, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
        "rotary_pct": 1.0, "seq_length": 8192, "max_position_embeddings": 8192, "no_bias": True,
        "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True, "use_flash_attn": False,
        "bf16": False, "fp16": False, "fp32": False, "scale_attn_weights": True, "use_cache": True,
        "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0, "initializer_range": 0.2, "torch_dtype": "float32",
        "vision_tower": "openai/clip-vit-large-patch14", "vision_select_layer": -2, "image_token_len": TOKENS,
        "use_im_start_end": True, "freeze_vision_tower": False,
        "im_start_token": ids["<img>"], "im_end_token": ids["</img>"], "im_patch_token": ids["<imgpad>"],
        # the overrides of the module docstring
        "vision_config": {**TINY_CLIP}, "sam_config": {**TINY_SAM}, "image_processor_high": "BlipImageEvalProcessor",
    }


def build_model(ref, config: dict, base: bool = False):
    """varyQwenForCausalLM of config (its hard-coded sizes already rewritten), in eval mode: Vary-toy's
    vary_toy_qwen1_8.py, or with base Vary-base's vary_qwen_vary.py."""
    modeling = ref.modeling_base if base else ref.modeling
    conf = modeling.varyConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return modeling.varyQwenForCausalLM(conf).eval()


def tokenizer(ref, folder: Path):
    return ref.tokenization.QWenTokenizer(str(folder / "qwen.tiktoken"))


def prompt_text(ref, turns: list[tuple[str, str | None]], system: bool = True) -> str:
    """Vary-toy's demo prompt (conv_templates['mpt'], Vary-toy's run_qwen_vary.py) of user/assistant turns."""
    conv = ref.conversation.conv_templates["mpt"].copy() if system else ref.conversation.conv_templates[
        "mpt_eval"].copy()
    for user, answer in turns:
        conv.append_message(conv.roles[0], user)
        conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def image_block(n: int = 1, newline: str = "\n") -> str:
    """n images as Vary-toy's demo writes one: <img> + 256 x <imgpad> + </img> + newline (Vary-base's demo: no
    newline)."""
    return ("<img>" + "<imgpad>" * TOKENS + "</img>" + newline) * n


def processors(ref):
    from transformers import CLIPImageProcessor

    return (CLIPImageProcessor(**CLIP_PREPROCESSOR), ref.blip.BlipImageEvalProcessor(image_size=1024),
            ref.transforms.test_transform)


def pixels(ref, images: list[Image.Image]):
    clip, blip, _ = processors(ref)
    low = torch.stack([clip.preprocess(im, return_tensors="pt")["pixel_values"][0] for im in images])
    high = torch.stack([blip(im.convert("RGB")) for im in images])
    return low, high


def forward_logits(model, ids: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], images=[(low, high)], use_cache=False).logits[0]


def check_saved(ref, folder: Path) -> None:
    """Load a saved tiny model with the reference (strict: every tensor name and shape must match) and compare
    its logits on the fixture prompt."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = build_model(ref, config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    want = load_file(str(OUT / "reference.safetensors"))
    report = json.loads((OUT / "reference.json").read_text())
    tok = tokenizer(ref, folder)
    ids = torch.tensor(tok(report["prompt"]).input_ids)
    if not torch.equal(ids, want["input_ids"]):
        raise SystemExit("the saved folder's tokenizer gives other input ids than the fixture's")
    pics = photos(*PHOTOS)
    low, high = pixels(ref, [pics[n] for n in report["prompt_images"]])
    logits = forward_logits(model, ids, low, high)[want["logit_rows"]]
    check_fixture_logits(folder, logits, want["logits"])


def main() -> None:
    args = parse_args(__doc__, "Vary-toy's Vary-master folder (holding vary/)")
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    vocab = sum(1 for line in RANKS.read_bytes().splitlines() if line.strip())
    ref = import_reference(args.reference.resolve(), Path(tempfile.mkdtemp(prefix="vary-ref-")), vocab)
    import transformers
    from safetensors.torch import save_file

    print(f"transformers {transformers.__version__}, reference from {args.reference}")
    if args.check_saved is not None:
        check_saved(ref, args.check_saved)
        return
    tiny = OUT / "tiny"
    if tiny.exists():
        shutil.rmtree(tiny)
    tiny.mkdir(parents=True)
    shutil.copy(RANKS, tiny / "qwen.tiktoken")
    (tiny / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2) + "\n")
    tok = tokenizer(ref, tiny)
    vocab_size = len(tok)
    if [tok.convert_tokens_to_ids(t) for t in REAL_IDS] != list(ref.ids.values()):
        raise SystemExit("the tokenizer's image tags are not at the ids the model code was rewritten to")
    config = tiny_config(vocab_size, ref.ids)
    model = build_model(ref, config)
    with torch.no_grad():  # SAM's pos_embed and rel_pos start at zero: make them matter
        for name, p in model.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_(0, 0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    (tiny / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eod = tok.convert_tokens_to_ids("<|endoftext|>")  # Qwen-1 keeps its token ids in generation_config.json
    (tiny / "generation_config.json").write_text(json.dumps({
        "chat_format": "chatml", "eos_token_id": eod, "pad_token_id": eod, "max_new_tokens": 2048}, indent=2) + "\n")

    pics = photos(*PHOTOS)
    names = ["astronaut", "rocket"]
    prompt = prompt_text(ref, [(image_block(2) + QUESTION, None)])
    ids = torch.tensor(tok(prompt).input_ids)
    low, high = pixels(ref, [pics[n] for n in names])
    logits = forward_logits(model, ids, low, high)  # (T, V)
    rows = torch.tensor(sorted(set(range(0, len(ids), 32)) | set(range(len(ids) - 16, len(ids)))))
    greedy, seq = [], ids
    for _ in range(20):  # greedy decoding, the whole sequence each step (the vision runs on every full forward)
        nxt = int(forward_logits(model, seq, low, high)[-1].argmax())
        greedy.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    tensors = {"input_ids": ids, "logits": logits[rows].contiguous(), "logit_rows": rows,
               "greedy_ids": torch.tensor(greedy)}
    text_ids = torch.tensor(tok(prompt_text(ref, [("Hello there", None)])).input_ids)
    with torch.no_grad():  # no images: the reference's forward skips the vision towers
        tensors["text_only_logits"] = model(input_ids=text_ids[None], use_cache=False).logits[0, -8:].contiguous()
    multi = prompt_text(ref, [(image_block(1) + "What is this?", "An astronaut."),
                              (image_block(1) + "And this?", None)])
    report = {
        "prompt": prompt, "prompt_images": names, "question": QUESTION,
        "prompt_multi_turn": multi, "multi_turn_ids": tok(multi).input_ids,
        "text_only_prompt": prompt_text(ref, [("Hello there", None)]),
        "text_only_ids": tok(prompt_text(ref, [("Hello there", None)])).input_ids,
        "special_ids": {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                                   *REAL_IDS)},
        "photos": {},
    }
    clip, blip, alb = processors(ref)
    for name, image in pics.items():
        views = {"clip": clip.preprocess(image, return_tensors="pt")["pixel_values"][0],
                 "blip": blip(image.convert("RGB")), "test_transform": alb(image.convert("RGB"))}
        report["photos"][name] = {"size": list(image.size), "mode": image.mode,
                                  **{f"{k}_sum": v.double().sum().item() for k, v in views.items()},
                                  **{f"{k}_abs_sum": v.double().abs().sum().item() for k, v in views.items()}}
        tensors[f"clip.{name}"] = views["clip"][:, 3::14, 3::14].contiguous()  # (3, 16, 16)
        for k in ("blip", "test_transform"):
            tensors[f"{k}.{name}"] = views[k][:, 5::64, 5::64].contiguous().float()  # (3, 16, 16)
    save_file(tensors, str(OUT / "reference.safetensors"))
    # Vary-base's code path: the same tensors in vary_qwen_vary.py, its demo's prompt (no newline after </img>)
    # and SAM processor (test_transform); vlmkit reads it from config.json's image_processor_high
    base = build_model(ref, {**config, "image_processor_high": "test_transform"}, base=True)
    base.load_state_dict(state, strict=True)
    base_prompt = prompt_text(ref, [(image_block(2, newline="") + QUESTION, None)])
    base_ids = torch.tensor(tok(base_prompt).input_ids)
    base_high = torch.stack([alb(pics[n].convert("RGB")) for n in names])
    base_logits = forward_logits(base, base_ids, low, base_high)
    base_rows = torch.tensor(sorted(set(range(0, len(base_ids), 64)) | set(range(len(base_ids) - 8, len(base_ids)))))
    base_greedy = []  # with the KV cache as Vary's generate runs: an answer holding <img> would fail the full
    with torch.no_grad():  # forward's <img>/</img> count check, and decode steps skip the vision branch
        out = base(input_ids=base_ids[None], images=[(low, base_high)], use_cache=True,
                   attention_mask=torch.ones(1, len(base_ids)))
        for _ in range(20):
            base_greedy.append(int(out.logits[0, -1].argmax()))
            out = base(input_ids=torch.tensor([[base_greedy[-1]]]), images=[(low, base_high)],
                       past_key_values=out.past_key_values, use_cache=True,
                       attention_mask=torch.ones(1, len(base_ids) + len(base_greedy)))
    save_file({"input_ids": base_ids, "logits": base_logits[base_rows].contiguous(), "logit_rows": base_rows,
               "greedy_ids": torch.tensor(base_greedy)}, str(OUT / "reference_base.safetensors"))
    print(f"Vary-base code: prompt tokens {len(base_ids)}, greedy {base_greedy}")
    (OUT / "reference.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"prompt tokens {len(ids)}, greedy {greedy}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
