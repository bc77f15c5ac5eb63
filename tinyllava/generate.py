"""Talk to LLaVA about pictures: a caption, an answer, or a conversation.

    python -m tinyllava.generate -p "What is the capital of France?"

Only the answer goes to stdout (streamed as it is decoded); diagnostics go to stderr.
"""
import argparse
import sys
import time

from .decoding import Sampling
from .errors import TinyLlavaError, cli_errors
from .options import (
    CAPTION_REQUEST,
    add_model_options,
    add_options,
    model_files,
    picked,
    quantized,
    threads_option,
)


def check_text(text, what="the prompt"):
    if text is None:
        raise TinyLlavaError(f"{what} is missing (end of input)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TinyLlavaError(f"{what} is not valid UTF-8") from None
    if not text.strip():
        raise TinyLlavaError(f"{what} is empty")
    return text


def input_turn():
    """One line from the user (stdin), or None at the end of input."""
    if sys.stdin.isatty():
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def parser():
    ap = argparse.ArgumentParser(
        prog="python -m tinyllava.generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + """
  python -m tinyllava.generate                                  # caption a demo photo
  python -m tinyllava.generate --image photo.jpg                # caption your photo
  python -m tinyllava.generate --image photo.jpg -p "What is the dog doing?"
  python -m tinyllava.generate --image photo.jpg --chat         # talk about it, turn by turn
  python -m tinyllava.generate -p "What is the capital of France?"   # text only
""")
    ap.add_argument("--image", action="append", metavar="PATH", help="an image (repeat for several)")
    ap.add_argument("-p", "--prompt", help="the user's message (with an image and no prompt: caption it; the stage-2 "
                    f"model is asked {CAPTION_REQUEST!r}, stage 1 sees the image alone, as it was trained)")
    ap.add_argument("--chat", action="store_true", help="a conversation: read more turns from stdin")
    ap.add_argument("-sys", "--system-prompt", help="system message (default: the model's own)")
    add_options(ap, Sampling)
    add_model_options(ap)  # -m, --stage, --projector, --adapter, --crop, --fused, -t (options.py)
    ap.add_argument("--trace", action="store_true",
                    help="print every stage to stderr: preprocessing, ViT blocks, projector, the prompt with the "
                         "image in place, prefill block by block, each decode step's top candidates")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    with cli_errors("tinyllava.generate"):
        from . import runtime, trace
        from .image import preprocess
        from .model import IMAGE, Chat, Llava, load_decoder, load_llava
        sampling = Sampling(**picked(args, Sampling)).check()
        if args.prompt is not None:
            check_text(args.prompt)
        t0 = time.perf_counter()
        compiling = runtime.CompileWatch(lambda: print("(first run: numba is compiling the fused loops for this CPU; "
                                                       "they are cached for later runs)", file=sys.stderr, flush=True))
        runtime.keep_freed_memory()
        engine = quantized(args.fused)
        runtime.use_threads(threads_option(args.threads))
        images = args.image or []
        captions = args.prompt is None and not args.chat
        if not images and captions:  # no arguments: a demo photo
            from .weights import demo_photos
            images = [demo_photos()["astronaut.png"]]  # a person: Flickr8k's domain (see README)
            print(f"(no --image given: captioning the demo photo {images[0]})", file=sys.stderr)
        pixels = [preprocess(p, pad=not args.crop) for p in images]  # bad images fail before anything loads
        projector, adapter = model_files(args.stage, args.projector, args.adapter, images=bool(images))
        if images:
            llava = load_llava(projector, args.model, quantized=engine, adapter=adapter)
            tokens = [trace.image_tokens(llava, p, pad=not args.crop) if args.trace else
                      llava.image_tokens(px[None])[0] for p, px in zip(images, pixels)]   # [196, d] each
            llava.tower = None  # its work is done: its memory is freed before the prompt
        else:
            llava, tokens = Llava(*load_decoder(args.model, quantized=engine)), []
            if adapter:  # text only: the stage-2 language model, without the vision side
                llava = load_llava(projector, args.model, tower=False, quantized=engine, adapter=adapter)
        observe = lambda: trace.decoding(llava.tok, args.temp) if args.trace else {}  # noqa: E731

        def ask(chat, question):  # -> tokens generated
            check_text(question, "the question")
            if args.trace:
                trace.prompt(llava.tok, chat.prompt(question)[1], len(tokens[0]) if tokens else 0)
            chat.ask(question, sampling, write, **observe())
            write("\n")
            return len(chat.ids)

        t1, c1 = time.perf_counter(), compiling.seconds
        count = 0
        if captions:  # image by image: a tuned model asked for a caption, stage 1 in its plain template
            for path, x in zip(images, tokens):
                if len(images) > 1:
                    write(f"{path}: ")
                if adapter:
                    count += ask(Chat(llava, [x], args.system_prompt), CAPTION_REQUEST)
                    continue
                if args.trace:
                    trace.prompt(llava.tok, [IMAGE], len(x))
                count += len(llava.complete(x[None], sampling, write, **observe())[1])
                write("\n")
        else:
            chat = Chat(llava, tokens, args.system_prompt)
            question = args.prompt if args.prompt is not None else input_turn()
            while question is not None:
                count += ask(chat, question)
                question = input_turn() if args.chat else None
        t2, c2 = time.perf_counter(), compiling.seconds
        answer = t2 - t1 - (c2 - c1)                  # the first run's compiling is counted on its own
        print(f"[load {t1 - t0 - c1:.1f} s, {count} tokens in {answer:.1f} s, {count / answer:.1f} tok/s"
              + (f"; compiling {c2:.1f} s]" if c2 else "]"), file=sys.stderr)
        compiling.close()


if __name__ == "__main__":
    main()
