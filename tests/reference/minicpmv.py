"""Build the MiniCPM-V 2.6 fixtures (tests/fixtures/minicpmv/) with MiniCPM-V 2.6's own remote code.

Upstream code: the Hub repository openbmb/MiniCPM-V-2_6's files modeling_minicpmv.py, configuration_minicpm.py,
modeling_navit_siglip.py, resampler.py, image_processing_minicpmv.py, processing_minicpmv.py and
tokenization_minicpmv_fast.py, as mirrored on GitHub by 404805854/minicpmv2.6-onnx, commit
8490e5923eeebae2ef7163fc7bb39f5b66967272 ("fork from hugging face original code"; later commits of that
repository edit the code for ONNX export and are not used). Environment: transformers 4.40.2 (the version
MiniCPM-V 2.6's config.json names, 4.40.0), tokenizers 0.19.1, torchvision 0.28.0 on torch 2.13 (CPU):

    python3 -m venv /work/refenv/minicpmv
    /work/refenv/minicpmv/bin/pip install torch==2.13.0
    /work/refenv/minicpmv/bin/pip install transformers==4.40.2 numpy pillow scikit-image safetensors \
        torchvision==0.28.0
    /work/refenv/minicpmv/bin/python tests/reference/minicpmv.py /path/to/reference/files

and, to check that the reference loads what vlmkit's save_pretrained writes (same logits):

    PYTHONPATH=src python -c "from vlmkit.load import load_model; \
        load_model('tests/fixtures/minicpmv/tiny').save_pretrained('/tmp/minicpmv/saved')"
    /work/refenv/minicpmv/bin/python tests/reference/minicpmv.py /path/to/reference/files \
        --check-saved /tmp/minicpmv/saved

Nothing inside the reference files is changed. Outside them, only `torchvision._meta_registrations` is stubbed
in sys.modules: PyPI's torchvision wheel's compiled ops do not load beside a CPU torch, and
modeling_minicpmv.py imports torchvision without using it; and resampler.py's annotations name `List`, which
its `from torch.nn.functional import *` no longer provides in torch 2.13, so typing.List is put in builtins. The model runs with attn_implementation "eager"
(MiniCPMV.init_vision_module picks eager for the tower itself).

The tiny checkpoint is the real config.json (tests/fixtures/minicpmv/real/config.json: the values of
openbmb/MiniCPM-V-2_6's config.json, whose architecture `vlmkit inspect` counts to 8,099.18M parameters, the
model card's 8B) with small dimensions, recorded in tiny/config.json: Qwen2 LM 128 wide (the resampler has
hidden_size // 128 heads, so 128 is the narrowest that has one), 4 heads, 2 KV heads, 2 layers, FFN 64;
SigLIP tower 16 wide, 2 heads, 3 layers, image_size 448 (a 32 x 32 position table instead of 70 x 70: views of
up to 39 patches a side are bucketed into it), query_num 64 and slicing (max 9 slices at 448) as released.
The weights are random (seeded), drawn wider than the reference's init so that every part moves the logits,
then rounded to bfloat16 and stored so (the release is bfloat16); both sides compute in float32 from them.

The tiny tokenizer is a byte-level BPE of 300 entries trained here with Qwen2's pre-tokenizer, plus
MiniCPM-V 2.6's added tokens in their order (<|endoftext|>, <|im_start|>, <|im_end|>, <image>, </image>,
<ref>, </ref>, <box>, </box>, <quad>, </quad>, <point>, </point>, <slice>, </slice>, <image_id>, </image_id>,
<unk>; the real <unk> is 128244 inside the base vocabulary), and tokenizer_config.json has the release's
special tokens and ChatML chat template.

Outputs (tests/fixtures/minicpmv/):
    tiny/                  config.json, model.safetensors (bf16), preprocessor_config.json, tokenizer files
    reference.safetensors  input_ids of the two-photo prompt, logits at logit_rows (every 16th position and the
                           last 24), 20 greedy ids, and per photo its tgt_sizes and a strided sample of every
                           view in the processor's reshaped patch layout (3, 14, L * 14)
    reference.json         prompt texts and ids (two photos, multi-turn, text only), per photo the size, grid,
                           placeholder token count and per-view sums
    real/                  (input, not written) MiniCPM-V-2_6's config.json and preprocessor_config.json
"""

from __future__ import annotations

import builtins
import importlib
import json
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path

import torch

from shared import check_fixture_logits, parse_args, photos

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "minicpmv"
# the photos processed (shared.PHOTOS: scikit-image's data, of different sizes and aspect ratios)
PHOTOS = ("astronaut", "chelsea", "rocket", "camera", "hubble", "coffee_strip", "astronaut_tall", "coffee_big")
SEED = 3
BPE_SIZE = 300
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
         "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"]
VOCAB = 320  # LM rows: the BPE entries, the added tokens, unused rows
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
IMAGE = "(<image>./</image>)"  # what MiniCPMV.chat writes for an image, one line of the message
QUESTION = "What do the two photos show?"


def import_reference(src: Path, work: Path) -> types.ModuleType:
    """The reference files, unchanged, as a package `minicpmv_ref` under work/ (their imports are relative)."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    builtins.List = typing.List  # resampler.py takes List from `from torch.nn.functional import *` (old torch)
    pkg = work / "minicpmv_ref"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("configuration_minicpm", "modeling_minicpmv", "modeling_navit_siglip", "resampler",
                 "image_processing_minicpmv", "processing_minicpmv", "tokenization_minicpmv_fast"):
        shutil.copy(src / f"{name}.py", pkg / f"{name}.py")
    sys.path.insert(0, str(work))
    return importlib.import_module("minicpmv_ref")


def build_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [QUESTION, "The cat sits on the left.", "A rocket stands on the launch pad under a blue sky.",
              "You are a helpful assistant.", "There is a red rocket and a tabby cat.", "What is in the picture?",
              "The astronaut smiles; a cup of coffee is on the table.", "Be brief. And this? An astronaut.",
              "Hello there, what is this photo of?"]
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "MiniCPMVTokenizerFast",
              "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
              "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": "<unk>", "errors": "replace", "split_special_tokens": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
              "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")


def tiny_config(real: dict) -> dict:
    """The real config.json with small dimensions (see the module docstring)."""
    cfg = json.loads(json.dumps(real))
    cfg.pop("_name_or_path", None)
    cfg.update(hidden_size=128, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, max_window_layers=2, vocab_size=VOCAB, torch_dtype="bfloat16",
               bos_token_id=ADDED.index("<|endoftext|>") + BPE_SIZE, eos_token_id=ADDED.index("<|im_end|>") + BPE_SIZE)
    cfg["vision_config"].update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                                image_size=448)
    return cfg


def make_model(ref_cfg_class, model_class, config: dict):
    cfg = ref_cfg_class(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures", "model_type")},
                        attn_implementation="eager")
    return model_class(cfg).eval()


def randomize(model: torch.nn.Module) -> None:
    """Seeded weights wide enough that every part matters, rounded to bfloat16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.2)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.normal_(0, 1.5 / fan_in**0.5)
            p.copy_(p.bfloat16().float())


def processor_for(ref, folder: Path, tokenizer=None):
    from minicpmv_ref.image_processing_minicpmv import MiniCPMVImageProcessor
    from minicpmv_ref.processing_minicpmv import MiniCPMVProcessor
    from minicpmv_ref.tokenization_minicpmv_fast import MiniCPMVTokenizerFast

    pre = json.loads((folder / "preprocessor_config.json").read_text())
    image_processor = MiniCPMVImageProcessor(**{k: v for k, v in pre.items() if k not in ("auto_map",)})
    if tokenizer is None:
        tokenizer = MiniCPMVTokenizerFast.from_pretrained(str(folder))
    return MiniCPMVProcessor(image_processor, tokenizer), tokenizer


def chat_text(tokenizer, messages: list[dict]) -> str:
    """MiniCPMV.chat's prompt: each image part a line `(<image>./</image>)`, lines joined by "\\n", ChatML."""
    msgs = []
    for m in messages:
        lines = [IMAGE if part == "image" else part for part in m["content"]]
        msgs.append({"role": m["role"], "content": "\n".join(lines)})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def logits_of(model, inputs) -> torch.Tensor:
    data = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
            "tgt_sizes": inputs["tgt_sizes"], "image_bound": inputs["image_bound"],
            "position_ids": torch.arange(inputs["input_ids"].shape[1])[None]}
    with torch.no_grad():
        return model(data).logits[0]


def check_saved(folder: Path, ref) -> None:
    """Load a saved tiny model with the reference (strict: every tensor name and shape must match), its processor
    from the saved preprocessor_config.json and tokenizer files, and compare the logits with the fixture's."""
    from minicpmv_ref.configuration_minicpm import MiniCPMVConfig
    from minicpmv_ref.modeling_minicpmv import MiniCPMV
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = make_model(MiniCPMVConfig, MiniCPMV, config)
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    report = json.loads((OUT / "reference.json").read_text())
    # the fixture's tokenizer files: the tokenizers library vlmkit runs (0.23) writes BPE merges as pairs, which
    # the 0.19 that transformers 4.40 needs cannot read; the check is of the model and processor files
    processor, _ = processor_for(ref, folder, processor_for(ref, OUT / "tiny")[1])
    pics = photos(*PHOTOS)
    inputs = processor([report["prompt"]], [[pics[n] for n in report["prompt_images"]]], return_tensors="pt")
    want = load_file(str(OUT / "reference.safetensors"))
    if not torch.equal(inputs["input_ids"][0].long(), want["input_ids"]):
        raise SystemExit("the saved folder's tokenizer/processor gives other input ids than the fixture's")
    logits = logits_of(model, inputs)[want["logit_rows"]]
    check_fixture_logits(folder, logits, want["logits"])


def main() -> None:
    args = parse_args(__doc__, "folder with the reference .py files")
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    ref = import_reference(args.reference.resolve(), Path(tempfile.mkdtemp(prefix="minicpmv-ref-")))
    import transformers
    from minicpmv_ref.configuration_minicpm import MiniCPMVConfig
    from minicpmv_ref.modeling_minicpmv import MiniCPMV
    from safetensors.torch import save_file

    print(f"transformers {transformers.__version__}, reference from {args.reference}")
    if args.check_saved is not None:
        check_saved(args.check_saved, ref)
        return
    tiny = OUT / "tiny"
    if tiny.exists():
        shutil.rmtree(tiny)
    build_tokenizer(tiny)
    config = tiny_config(json.loads((OUT / "real" / "config.json").read_text()))
    (tiny / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(OUT / "real" / "preprocessor_config.json", tiny / "preprocessor_config.json")
    model = make_model(MiniCPMVConfig, MiniCPMV, config)
    randomize(model)
    save_file({k: v.contiguous().bfloat16() for k, v in model.state_dict().items()}, str(tiny / "model.safetensors"),
              metadata={"format": "pt"})

    processor, tokenizer = processor_for(ref, tiny)
    pics = photos(*PHOTOS)
    two = ["hubble", "chelsea"]
    prompt = chat_text(tokenizer, [{"role": "user", "content": ["image", "image", QUESTION]}])
    inputs = processor([prompt], [[pics[n] for n in two]], return_tensors="pt")
    input_ids = inputs["input_ids"][0].long()
    logits = logits_of(model, inputs)
    with torch.no_grad():  # greedy, no stop token, as MiniCPMV.generate runs the LLM on the embeddings
        embeds, _ = model.get_vllm_embedding({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"],
                                              "tgt_sizes": inputs["tgt_sizes"], "image_bound": inputs["image_bound"]})
        greedy = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(inputs["input_ids"]),
                                    max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0]
    T = input_ids.shape[0]
    rows = torch.cat([torch.arange(0, T - 24, 16), torch.arange(T - 24, T)])
    tensors = {"input_ids": input_ids, "logit_rows": rows, "logits": logits[rows], "greedy_ids": greedy,
               "last_logits": logits[-1]}
    multi = [{"role": "system", "content": ["Be brief."]},
             {"role": "user", "content": ["image", "What is this?"]},
             {"role": "assistant", "content": ["An astronaut."]},
             {"role": "user", "content": ["image", "And this?"]}]
    multi_text = chat_text(tokenizer, multi)
    text_only = chat_text(tokenizer, [{"role": "user", "content": ["Hello there"]}])
    report = {
        "transformers": transformers.__version__,
        "prompt": prompt, "prompt_images": two, "question": QUESTION,
        "multi_turn": multi_text, "multi_turn_images": ["astronaut", "rocket"],
        "multi_turn_ids": processor([multi_text], [[pics["astronaut"], pics["rocket"]]],
                                    return_tensors="pt")["input_ids"][0].tolist(),
        "text_only": text_only, "text_only_ids": tokenizer.encode(text_only),
        "photos": {},
    }
    image_processor = processor.image_processor
    for name, image in pics.items():
        out = image_processor([[image]], return_tensors="pt")
        views = out["pixel_values"][0]  # per view (3, 14, L * 14)
        grid = image_processor.get_sliced_grid(image.size, image_processor.max_slice_nums)
        placeholder = image_processor.get_slice_image_placeholder(image.size, 0)
        ids = tokenizer.encode(placeholder)
        report["photos"][name] = {
            "size": list(image.size), "mode": image.mode, "grid_cols_rows": grid,
            "tgt_sizes": out["tgt_sizes"][0].tolist(), "placeholder_tokens": len(ids),
            "query_tokens": ids.count(tokenizer.unk_token_id),
            "view_sums": [v.double().sum().item() for v in views],
            "view_abs_sums": [v.double().abs().sum().item() for v in views],
        }
        for k, v in enumerate(views):
            tensors[f"sample.{name}.{k}"] = v[:, ::5, ::97].contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    (OUT / "reference.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"prompt tokens {T}, greedy {greedy.tolist()}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
