"""Build the DeepSeek-VL2 fixtures of tests/test_checkpoint_deepseek_vl2.py with DeepSeek's own code.

Upstream: GitHub deepseek-ai/DeepSeek-VL2, commit ef9f91e2b6426536b83294c11742c27be66361b1 (2025-02-26),
`deepseek_vl2/models/` (modeling_deepseek_vl_v2.py, siglip_vit.py, modeling_deepseek.py,
processing_deepseek_vl_v2.py, conversation.py). The reference code is an argument, never part of vlmkit.

Environment (a virtualenv outside the repository; torch 2.13.0+cpu from the system site-packages):

    python -m venv --system-site-packages /work/venvs/dsvl2
    /work/venvs/dsvl2/bin/pip install --no-deps transformers==4.38.2 tokenizers==0.15.2 timm==0.9.16 \
        torchvision==0.28.0 attrdict==2.0.1 einops==0.8.0 huggingface_hub==0.24.7
    /work/venvs/dsvl2/bin/python tests/reference/deepseek_vl2.py /path/to/DeepSeek-VL2

and, to check that what vlmkit's save_pretrained writes loads in the reference to the same logits:

    PYTHONPATH=src python -c "from vlmkit.load import load_model; \
        load_model('tests/fixtures/deepseek_vl2/tiny').save_pretrained('/tmp/dsvl2/saved-tiny')"
    cp tests/fixtures/deepseek_vl2/tiny/tokenizer*.json /tmp/dsvl2/saved-tiny/
    /work/venvs/dsvl2/bin/python tests/reference/deepseek_vl2.py /path/to/DeepSeek-VL2 \
        --check-saved-tiny /tmp/dsvl2/saved-tiny      (and the same for small and base)

(the copy: the tokenizers library vlmkit runs, 0.23, writes BPE merges as pairs, which the 0.15 that
transformers 4.38 needs cannot read; the check is of the model files.)

Two stand-ins, installed into sys.modules below before the reference is imported, and only here:
- `xformers.ops.memory_efficient_attention`: siglip_vit.Attention imports it unconditionally; ours calls
  torch's scaled_dot_product_attention on the same (B, N, heads, head_dim) layout (no dropout at eval).
- `torchvision._meta_registrations`: the PyPI torchvision wheel's compiled ops link against CUDA torch and
  do not load beside CPU torch, so registering their meta kernels fails at import; the reference uses only
  torchvision's Python transforms (ToTensor, Normalize), which do not need them.

What it writes under tests/fixtures/deepseek_vl2/:
- `tiny/`, `small/` and `base/`: checkpoints in the original layout (config.json = the real deepseek-vl2-tiny,
  -small and deepseek-vl2 config.json of real_configs/ with small dimensions, model.safetensors in bfloat16 as
  the releases are, the tokenizer, processor_config.json). tiny: DeepSeekMoE with multi-head attention
  (use_mla false); small: latent attention (use_mla true), both greedy softmax routing with a dense first
  layer; base: latent attention and noaux_tc routing over sigmoid scores with the expert correction bias,
  weights renormalised and scaled by 2.0.
- `tokenizer` files inside each: a byte-level BPE of 360 entries trained here, plus the special tokens
  DeepSeek-VL2's processor and prompt use, at ids of their own.
- `<model>/expected.safetensors`: for a prompt with two photos (chelsea 451x300 and rocket 640x427) the
  reference's input ids, its logits at every text position and the sum of the logits at every position,
  and 20 greedy tokens (the reference's forward recomputed over the whole sequence per step, no cache);
  a two-turn conversation's input ids (format_messages_v2).
- `processor.safetensors`: for 7 photos alone in a prompt (and the first two in a three-image prompt, where
  tiling is off) the reference processor's images_spatial_crop, token count, per-view sums and sums of
  squares, a strided subsample of every view, exact integer checksums of the 0-255 values every view was
  normalised from (checked exact here), and the full pixel tensor of one photo (as those 0-255 values).
- `prompts.json`: the reference's prompt text (sft_format) of the test prompt and the conversation.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "deepseek_vl2"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
ADDED = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]
VOCAB = 384  # LM rows; the tokenizer has 360 BPE entries + the added tokens
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "page", "coins"]
PROMPT_PHOTOS = ["chelsea", "rocket"]
QUESTION = "Describe the two pictures. Where is the cat?"
STRIDE = 16  # subsample of every view: pixels [::16, ::16]
REAL_CONFIG = {"tiny": "deepseek-vl2-tiny.json", "small": "deepseek-vl2-small.json", "base": "deepseek-vl2.json"}


def install_stand_ins() -> None:
    """The two modules named in the module docstring, in sys.modules."""
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v, p=0.0):  # (B, N, H, D) each, as xformers takes them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p)
        return out.transpose(1, 2)  # (B, N, H, D)

    ops.memory_efficient_attention = memory_efficient_attention
    xformers = types.ModuleType("xformers")
    xformers.ops = ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops,
                        "torchvision._meta_registrations": types.ModuleType("torchvision._meta_registrations")})


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def build_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json: byte-level BPE trained on a few sentences, DeepSeek's specials."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [QUESTION, "The cat sits on the left.", "A rocket stands on the launch pad under a blue sky.",
              "Locate the cat in the image.", "There is a red rocket and a tabby cat.", "What is in the picture?",
              "The astronaut smiles; a cup of coffee is on the table.", "Where is the rocket? It is on the right."]
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED])
    assert tok.get_vocab_size() <= VOCAB
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "unk_token": None, "add_bos_token": False, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 16384}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")


def small_config(real: dict, lm: dict) -> dict:
    """The real config.json with small dimensions (the keys the release writes, the values shrunk)."""
    cfg = json.loads(json.dumps(real))
    cfg["vision_config"].update(width=32, layers=2, heads=2)
    cfg["projector_config"].update(n_embed=48, input_dim=32)
    cfg["language_config"].update(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                  n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                                  n_shared_experts=2, num_attention_heads=4, num_key_value_heads=4, **lm)
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits and routing have clear margins (a 0.02-std init leaves near-ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("norm" in name or name.endswith("layernorm.weight")) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else p[0].numel()
                std = 1.0 if "embed_tokens" in name else 0.7 / math.sqrt(fan_in)
                p.copy_(std * torch.randn(p.shape, generator=g))
    # bfloat16 in the file, as the releases are; the reference then runs the same values in fp32
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16).float()


def processor_for(ref, folder: Path, cfg: dict):
    from transformers import LlamaTokenizerFast

    tokenizer = LlamaTokenizerFast.from_pretrained(str(folder))
    return ref.DeepseekVLV2Processor(tokenizer=tokenizer, candidate_resolutions=cfg["candidate_resolutions"],
                                     patch_size=14, downsample_ratio=2)


def write_processor_config(folder: Path, cfg: dict) -> None:
    """processor_config.json with the keys the release's carries."""
    proc = {"add_special_token": False, "candidate_resolutions": cfg["candidate_resolutions"],
            "downsample_ratio": 2, "ignore_id": -100, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_token": "<image>", "mask_prompt": False, "normalize": True, "pad_token": None,
            "patch_size": 14, "processor_class": "DeepseekVLV2Processor", "sft_format": "deepseek"}
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=1) + "\n")


def build_model(ref, name: str, lm: dict, seed: int) -> None:
    from deepseek_vl2.models.modeling_deepseek_vl_v2 import (
        DeepseekVLV2Config,
        DeepseekVLV2ForCausalLM,
    )
    from safetensors.torch import save_file

    real = json.loads((OUT / "real_configs" / REAL_CONFIG[name]).read_text())
    cfg = small_config(real, lm)
    folder = OUT / name
    build_tokenizer(folder)
    torch.manual_seed(seed)
    model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config(**cfg)).eval()
    randomize(model, seed)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    write_processor_config(folder, cfg)

    processor = processor_for(ref, folder, cfg)
    images = [photo(p) for p in PROMPT_PHOTOS]
    conversation = [{"role": "<|User|>", "content": "<image>\n<image>\n" + QUESTION},
                    {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=images, force_batchify=True, system_prompt="")
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(input_ids=inputs.input_ids, images=inputs.images,
                                             images_seq_mask=inputs.images_seq_mask,
                                             images_spatial_crop=inputs.images_spatial_crop)
        logits = model.language(inputs_embeds=embeds, attention_mask=inputs.attention_mask.long()).logits[0]  # (T, V)
        tokens, seq = [], embeds
        for _ in range(20):  # greedy, recomputing the whole sequence each step (no cache)
            step = model.language(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], dtype=torch.long))
            nxt = int(step.logits[0, -1].argmax())
            tokens.append(nxt)
            seq = torch.cat([seq, model.language.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    text_pos = (~inputs.images_seq_mask[0]).nonzero().flatten()
    two_turns = [{"role": "<|User|>", "content": "<image>\nWhat is in the picture?"},
                 {"role": "<|Assistant|>", "content": "A tabby cat."},
                 {"role": "<|User|>", "content": "Where is the cat?"},
                 {"role": "<|Assistant|>", "content": ""}]
    turns = processor(conversations=two_turns, images=images[:1], force_batchify=True, system_prompt="")
    save_file({"input_ids": inputs.input_ids[0].contiguous(), "images_seq_mask": inputs.images_seq_mask[0].contiguous(),
               "images_spatial_crop": inputs.images_spatial_crop[0].contiguous(),
               "text_positions": text_pos.contiguous(), "text_logits": logits[text_pos].contiguous(),
               "logit_sums": logits.double().sum(-1).contiguous(), "greedy_tokens": torch.tensor(tokens),
               "two_turn_input_ids": turns.input_ids[0].contiguous()},
              str(folder / "expected.safetensors"))
    prompts = {"question": QUESTION, "prompt_photos": PROMPT_PHOTOS, "sft_format": inputs.sft_format[0],
               "two_turns": two_turns, "two_turns_sft_format": turns.sft_format[0]}
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=1, ensure_ascii=False) + "\n")
    size = (folder / "model.safetensors").stat().st_size
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, model.safetensors {size} bytes, "
          f"{inputs.input_ids.shape[1]} prompt tokens, greedy {tokens}")


def build_processor_fixture(ref) -> None:
    from safetensors.torch import save_file

    cfg = json.loads((OUT / "tiny" / "config.json").read_text())
    processor = processor_for(ref, OUT / "tiny", cfg)
    out: dict[str, torch.Tensor] = {}
    cases = [(p, [p]) for p in PHOTOS] + [(f"{p}@3", PHOTOS[:3]) for p in PHOTOS[:2]]
    for key, shown in cases:
        images = [photo(p) for p in shown]
        which = shown.index(key.split("@")[0])
        prompt = "".join("<image>\n" for _ in images) + "Describe."
        res = processor(prompt=prompt, images=images, force_batchify=False)
        first = sum(1 + int(w * h) for w, h in res.images_spatial_crop[:which].tolist())
        w, h = res.images_spatial_crop[which].tolist()
        views = res.images[first:first + 1 + w * h]  # (1 + w*h, 3, 384, 384)
        out[f"{key}.spatial_crop"] = res.images_spatial_crop[which].contiguous()
        out[f"{key}.num_tokens"] = torch.tensor(res.num_image_tokens[which])
        out[f"{key}.view_sums"] = views.double().sum(dim=(1, 2, 3))
        out[f"{key}.view_sq_sums"] = views.double().pow(2).sum(dim=(1, 2, 3))
        out[f"{key}.subsample"] = views[:, :, ::STRIDE, ::STRIDE].contiguous()
        u8 = torch.round((views * 0.5 + 0.5) * 255)
        assert torch.equal((u8 / 255 - 0.5) / 0.5, views), "pixels are not 0-255 values normalised"
        u8 = u8.to(torch.int64).flatten(1)  # (views, 3*384*384)
        out[f"{key}.u8_sums"] = u8.sum(1)  # exact: any one pixel off by one level shows
        out[f"{key}.u8_weighted"] = (u8 * (torch.arange(u8.shape[1]) % 9973)).sum(1)  # and where it is
        if key == "chelsea":
            out[f"{key}.pixels_u8"] = u8.view(views.shape).to(torch.uint8).contiguous()
    save_file(out, str(OUT / "processor.safetensors"))
    print("processor:", {k: out[k].tolist() for k in out if k.endswith(("spatial_crop", "num_tokens"))})


def check_saved(name: str, folder: Path) -> None:
    """Load a folder vlmkit's save_pretrained wrote from fixture `name` with the reference code and compare its
    logits on the fixture's prompt with the fixture's (the save's layout is the reference's own)."""
    from deepseek_vl2.models.modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM
    from safetensors.torch import load_file

    model = DeepseekVLV2ForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    ref = load_file(str(OUT / name / "expected.safetensors"))
    processor = processor_for(sys.modules["deepseek_vl2.models"], folder, json.loads((folder / "config.json").read_text()))
    conversation = [{"role": "<|User|>", "content": "<image>\n<image>\n" + QUESTION}, {"role": "<|Assistant|>", "content": ""}]
    inputs = processor(conversations=conversation, images=[photo(p) for p in PROMPT_PHOTOS], force_batchify=True)
    assert torch.equal(inputs.input_ids[0], ref["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, images=inputs.images, images_seq_mask=inputs.images_seq_mask,
                       images_spatial_crop=inputs.images_spatial_crop,
                       attention_mask=inputs.attention_mask.long(), use_cache=False).logits[0]
    diff = (logits[ref["text_positions"]] - ref["text_logits"]).abs().max().item()
    print(f"{folder} loaded by the reference: text logits differ from fixture {name!r} by at most {diff:.3g}")
    assert diff < 1e-4


def main() -> None:
    checks = [f"--check-saved-{name}" for name in REAL_CONFIG]
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] not in checks):
        raise SystemExit("usage: python tests/reference/deepseek_vl2.py /path/to/DeepSeek-VL2 (its checkout)\n"
                         "   or: ... /path/to/DeepSeek-VL2 --check-saved-tiny|-small|-base DIR "
                         "(a folder vlmkit's save_pretrained wrote from that fixture, tokenizer files included)")
    install_stand_ins()
    sys.path.insert(0, str(Path(sys.argv[1]).resolve()))
    torch.set_num_threads(1)
    import deepseek_vl2.models as ref

    if len(sys.argv) == 4:
        check_saved(sys.argv[2].rsplit("-", 1)[1], Path(sys.argv[3]))
        return

    build_model(ref, "tiny", {"use_mla": False}, seed=0)
    build_model(ref, "small", {"use_mla": True, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8,
                               "qk_rope_head_dim": 4, "v_head_dim": 12}, seed=1)
    build_model(ref, "base", {"use_mla": True, "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8,
                              "qk_rope_head_dim": 4, "v_head_dim": 12}, seed=2)
    build_processor_fixture(ref)


if __name__ == "__main__":
    main()
