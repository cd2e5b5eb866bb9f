"""The verbs that talk with a model: `vlmkit generate` (one prompt, optionally about images and videos) and
`vlmkit chat` (several turns in the terminal, or one with --prompt), both streaming the answer to stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vlmkit.chat_session import ChatSession
from vlmkit.commands.common import add_model_flag, load_model_of
from vlmkit.generate import GenerationConfig, generate, stream
from vlmkit.image.load import load_image
from vlmkit.image.video import VideoFrames, load_video_frames
from vlmkit.text.qwen_chat import query_parts


DEFAULT_VIDEO_FPS = 2.0  # Qwen2-VL samples video at 2 frames per second

CHAT_COMMANDS = "commands: /image PATH (attach to the next question), /reset, /save FILE, /quit"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `generate` and `chat`."""
    _add_generate(sub)
    _add_chat(sub)


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    """The sampling and stopping flags shared by the verbs that generate (read back by _generation_config)."""
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text, or at this special token, e.g. "
                        "'<|im_end|>' (repeatable); answers also end at the model's end-of-turn and eos tokens")
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
    add_model_flag(p)
    p.add_argument("--prompt", required=True, help="the user message (Qwen-VL models: images may also be written "
                                                   "in it as <img>path</img>, as Qwen-VL's own prompts do)")
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
    loaded = load_model_of(args)
    asked: list[dict[str, str]] = [{"type": "text", "text": args.prompt}]
    in_text: list[str] = []
    tags = getattr(loaded.tokenizer, "image_tags", None)  # Qwen-VL's: images may be written <img>path</img>
    if tags is not None and tags["image_start_tag"] in args.prompt:
        asked, in_text = query_parts(args.prompt, tags)
    images = [load_image(path) for path in args.image]
    videos = _load_videos(args)
    written = [load_image(path) for path in in_text]
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos] + asked
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": content}]
    built = loaded.prompt(messages, loaded.plan_images([*images, *videos, *written]))  # in content order
    prompt = built.ids
    prefill = loaded.image_inputs(built.plans)
    cfg = _generation_config(args)
    start = time.perf_counter()
    with torch.inference_mode():
        if args.json:
            result = generate(loaded.model, [prompt], cfg, prefill_inputs=prefill, tokenizer=loaded.tokenizer)
            ids, reason, text = result.token_ids[0], result.finish_reasons[0], result.texts[0]
        else:
            pieces = stream(loaded.model, prompt, cfg, prefill_inputs=prefill, tokenizer=loaded.tokenizer)
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


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a model in the terminal: images, several turns, streamed answers",
                       description="Chat with a model. Each line you type is a question, answered as a stream; "
                                   f"{CHAT_COMMANDS}; end of input also quits. With --prompt, ask once and exit. "
                                   "An image is encoded once per conversation, however many turns follow.")
    add_model_flag(p)
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
    session = ChatSession(load_model_of(args), _generation_config(args), system=args.system)
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
