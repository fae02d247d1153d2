"""`bitskip`: init, pack, generate, perplexity and serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

# Before torch loads the OpenMP runtime (it reads this once): threads that finish a parallel
# region sleep instead of spinning. A CPU decode step runs ~100 short regions; on a machine with
# other work, spinning threads take the cores from the ones a region waits for (measured: a
# paper-1b step at 2 threads 645 ms spinning, 143 ms passive, on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from models.checkpoint import CheckpointError, load_checkpoint, pack_checkpoint  # noqa: E402
from models.config import PRESETS, VARIANTS, ConfigError, preset
from models.ref_import import (NON_CAUSAL_WARNING, RefCheckpointError, convert_ref_checkpoint, is_ref_checkpoint,
                               load_model)


def _exit_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layers like 6,12,18,24, got {text!r}")


def _add_device_args(s: argparse.ArgumentParser, eager: bool = False) -> None:
    """--device / --backend (engine/backends), and --enforce-eager where decode steps repeat."""
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): the GPU when CUDA and Triton are there, else the CPU")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto picks triton on cuda, torch on cpu; triton on cpu needs "
                        "TRITON_INTERPRET=1 (slow, for checking the GPU code)")
    if eager:
        s.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs: launch every decode kernel eagerly (GPU only)")


def _model_source(s: argparse.ArgumentParser) -> None:
    """--tokenizer and --generation: for checkpoints of the public BitSkip training code."""
    s.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to use (checkpoints of the public BitSkip code ship none; "
                        "without one, only token ids are served)")
    s.add_argument("--generation", type=int, choices=(1, 2), default=1,
                   help="public BitSkip code generation of a bitskip-ref checkpoint: 1 (no causal "
                        "mask, the default) or 2 (causal)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitskip", description="Serve early-exit ternary (BitSkip) models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a random-weight packed checkpoint")
    s.add_argument("--preset", required=True, choices=sorted(PRESETS))
    s.add_argument("--variant", default="v1", choices=sorted(VARIANTS))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("dir", type=Path)

    s = sub.add_parser("pack", help="convert a latent checkpoint to the packed form")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)

    s = sub.add_parser("convert", help="convert a checkpoint of another format into ours (packed)")
    s.add_argument("--from", dest="source_format", default="auto", choices=["auto", "bitskip-ref"],
                   help="auto (default): detected from the files (a Hugging Face BitNet directory, the "
                        "public BitSkip training code's files, or ours); bitskip-ref: model_full.pt, "
                        "model.safetensors or a wrapper .pt of the public BitSkip training code")
    _model_source(s)
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)

    s = sub.add_parser("generate", help="generate text at a fixed exit layer")
    s.add_argument("--model", required=True, type=Path)
    _model_source(s)
    s.add_argument("--exit-layer", type=int, default=None, help="blocks 1..K run (default: all)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[])
    s.add_argument("--threshold", type=float, default=None,
                   help="confidence policy: each token exits at the first exit point this sure")
    s.add_argument("--min-exit-layer", type=int, default=None)
    s.add_argument("--exit-points", type=_exit_layers, default=None,
                   help="confidence policy: layers it may stop at (default: the model's exit points)")
    s.add_argument("--speculative", action="store_true",
                   help="speculative policy: full-depth output, drafted at --draft-exit-layer")
    s.add_argument("--draft-exit-layer", type=int, default=None)
    s.add_argument("--num-draft-tokens", type=int, default=None)
    s.add_argument("--draft-confidence", type=float, default=None,
                   help="speculative: stop drafting at a draft less sure than this")
    _add_device_args(s, eager=True)
    s.add_argument("prompt")

    s = sub.add_parser("perplexity", help="perplexity of a text file at several exit layers")
    s.add_argument("--model", required=True, type=Path)
    _model_source(s)
    s.add_argument("--exit-layers", type=_exit_layers, default=None,
                   help="comma-separated, e.g. 6,12,18,24 (default: exit points and L)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_device_args(s)
    s.add_argument("file", type=Path)

    s = sub.add_parser("train", help="train a BitSkip model with the paper's recipe")
    s.add_argument("--corpus", type=Path, required=True, help="directory with train.txt and heldout.txt")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--preset", default="small-24l", choices=sorted(PRESETS))
    s.add_argument("--variant", default="v1", choices=sorted(VARIANTS))
    s.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default: the preset's)")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--early-exit-start", type=float, default=0.5,
                   help="fraction of steps before the early-exit loss is switched on")
    s.add_argument("--no-layer-dropout", action="store_true")
    s.add_argument("--no-early-exit", action="store_true")
    s.add_argument("--eval-every", type=int, default=100)
    s.add_argument("--checkpoint-every", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--resume", action="store_true", help="continue from OUT/latest")

    s = sub.add_parser("serve", help="serve a model over HTTP (default: the bundled model)")
    # An empty BITSKIP_MODEL (compose's ${BITSKIP_MODEL:-}) means unset, not the directory ".".
    s.add_argument("--model", type=Path, default=os.environ.get("BITSKIP_MODEL") or None,
                   help="checkpoint directory, or a checkpoint of the public BitSkip training code "
                        "(default: $BITSKIP_MODEL, else the bundled default model)")
    _model_source(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=32, help="requests running at once")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429")
    s.add_argument("--max-batched-tokens", type=int, default=512, help="tokens computed per engine step")
    s.add_argument("--api-key", default=os.environ.get("BITSKIP_API_KEY"))
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: all cores but one, at least 1)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    s.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                   help="larger request bodies get 413 before they are read")
    s.add_argument("--max-perplexity-tokens", type=int, default=32768,
                   help="longer /perplexity inputs get 413 (they are scored in chunks beside other requests)")
    s.add_argument("--metrics-auth", action="store_true",
                   help="/metrics needs the API key too (default: open, like /health and /ready)")
    s.add_argument("--log-level", default="info")
    _add_device_args(s, eager=True)
    s.add_argument("--skip-warmup", action="store_true",
                   help="GPU: do not capture the decode graphs of every batch size at start-up "
                        "(the first request of each batch size then waits for them)")
    return p


def cmd_init(args) -> None:
    from models.random_checkpoint import write_random_checkpoint
    config = preset(args.preset, args.variant)
    t0 = time.perf_counter()
    write_random_checkpoint(args.dir, config, args.seed)
    print(f"wrote {args.preset} ({args.variant}, {config.num_parameters() / 1e6:.1f}M parameters, "
          f"packed) to {args.dir} in {time.perf_counter() - t0:.1f}s")


def cmd_pack(args) -> None:
    ckpt = pack_checkpoint(args.src, args.dst)
    print(f"packed {args.src} -> {args.dst} ({ckpt.form})")


def cmd_convert(args) -> None:
    if args.source_format == "auto" and not is_ref_checkpoint(args.src):
        ckpt = pack_checkpoint(args.src, args.dst)  # a Hugging Face BitNet directory, or ours
        print(f"converted {args.src} -> {args.dst} ({ckpt.config.num_hidden_layers} layers, {ckpt.form})")
        return
    ckpt = convert_ref_checkpoint(args.src, args.dst, args.tokenizer, args.generation)
    c = ckpt.config
    print(f"converted {args.src} -> {args.dst} ({c.num_hidden_layers} layers, "
          f"{'causal' if c.causal else 'NO causal mask'}, "
          f"{'tokenizer ' + str(args.tokenizer) if ckpt.tokenizer else 'no tokenizer: token ids only'})")


def cmd_generate(args) -> None:
    from engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(load_model(args.model, args.tokenizer, args.generation), EngineConfig(
        max_num_seqs=1, device=args.device, backend=args.backend, enforce_eager=args.enforce_eager))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    confidence = None
    if args.threshold is not None:
        confidence = engine.confidence_rule(args.threshold, args.min_exit_layer, exit_points=args.exit_points)
    speculative = (engine.speculative_rule(args.draft_exit_layer, args.num_draft_tokens, args.draft_confidence)
                   if args.speculative else None)
    t0 = time.perf_counter()
    seq = engine.add_request(engine.encode(args.prompt), params, args.exit_layer, confidence=confidence,
                             speculative=speculative)
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    print(seq.text)
    depth = (f"mean exit layer {sum(seq.exit_layers) / max(1, len(seq.exit_layers)):.1f} (confidence)"
             if confidence else f"exit layer {seq.exit_layer}")
    if speculative:
        s = seq.speculation
        depth += (f" (speculative, drafted at {speculative.draft_exit_layer}: "
                  f"{s.accepted}/{s.drafted} drafts accepted)")
    print(f"[{len(seq.output_ids)} tokens at {depth} in {dt:.2f}s, finish_reason={seq.finish_reason}]",
          file=sys.stderr)


def cmd_perplexity(args) -> None:
    from engine import EngineConfig, LLMEngine
    ckpt = load_model(args.model, args.tokenizer, args.generation)
    if ckpt.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: pass --tokenizer FILE (a tokenizer.json)")
    c = ckpt.config
    layers = args.exit_layers or sorted(set(c.exit_points) | {c.num_hidden_layers})
    bad = [k for k in layers if not 1 <= k <= c.num_hidden_layers]
    if bad:
        raise ValueError(f"--exit-layers must be in 1..{c.num_hidden_layers}, got {bad}")
    try:
        text = args.file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {args.file}: {e}") from None
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=1, device=args.device, backend=args.backend))
    result = engine.perplexity(engine.encode(text), layers)
    if not c.causal:
        print(f"warning: {NON_CAUSAL_WARNING}", file=sys.stderr)
    if args.json:
        print(json.dumps({"tokens": result.tokens,
                          "perplexity": {str(k): v for k, v in result.perplexity.items()},
                          "nll": {str(k): v for k, v in result.nll.items()}}, indent=2))
        return
    print(f"{'exit layer':>10}  {'perplexity':>12}  {'nll':>8}   ({result.tokens} tokens scored)")
    for k in layers:
        print(f"{k:>10}  {result.perplexity[k]:>12.3f}  {result.nll[k]:>8.4f}")


def cmd_train(args) -> None:
    import dataclasses

    import torch

    from models.checkpoint import load_checkpoint as load
    from models.tokenizer import train_bpe_tokenizer
    from models.train import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset(args.preset, args.variant)
    if args.vocab_size:
        config = dataclasses.replace(config, vocab_size=args.vocab_size)
    train_txt, heldout_txt = args.corpus / "train.txt", args.corpus / "heldout.txt"
    for f in (train_txt, heldout_txt):
        if not f.exists():
            raise ValueError(f"{f} does not exist (build the corpus with scripts/build_corpus.sh)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resume and (args.out / "latest" / "tokenizer.json").exists():
        tokenizer = load(args.out / "latest").tokenizer
    else:
        t0 = time.perf_counter()
        tokenizer = train_bpe_tokenizer([str(train_txt)], config.vocab_size)
        print(f"trained a {tokenizer.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.1f}s")
    generation_config = {"bos_token_id": tokenizer.token_to_id("<|bos|>"),
                         "eos_token_id": tokenizer.token_to_id("<|eos|>")}

    def ids(path):
        return torch.tensor(tokenizer.encode(path.read_text(), add_special_tokens=False).ids)
    train_ids, heldout_ids = ids(train_txt), ids(heldout_txt)
    print(f"{len(train_ids)} training tokens, {len(heldout_ids)} held-out tokens; "
          f"{config.num_parameters() / 1e6:.2f}M parameters")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      p_max=0.0 if args.no_layer_dropout else 0.5,
                      early_exit_lambda=0.0 if args.no_early_exit else 0.3,
                      early_exit_start=args.early_exit_start, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device)
    train(config, cfg, train_ids, heldout_ids, tokenizer, generation_config, args.out, args.resume,
          log=lambda m: print(m, flush=True))


def cmd_serve(args) -> None:
    from engine import EngineConfig, LLMEngine
    from models.default_model import resolve_model

    from .app import ServerSettings, create_app
    from .chat_template import load_chat_template
    from .graceful import serve
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.metrics_auth and not args.api_key:
        raise ValueError("--metrics-auth needs an API key (--api-key or $BITSKIP_API_KEY)")
    path = resolve_model(args.model)
    # Leave a core to the HTTP side: torch's threads spin while they wait, so an engine that
    # takes every core slows badly whenever the event loop runs.
    threads = args.threads or max(1, (os.cpu_count() or 1) - 1)
    engine = LLMEngine(load_model(path, args.tokenizer, args.generation), EngineConfig(
        max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_batched_tokens,
        num_threads=threads, device=args.device, backend=args.backend, enforce_eager=args.enforce_eager))
    log = logging.getLogger("bitskip.server")
    log.info("engine on %s; %d torch threads", engine.backend.describe(), threads)
    if not args.skip_warmup:
        t0 = time.perf_counter()
        if captured := engine.warm_up():
            log.info("warm-up: %d decode graphs captured in %.1f s", captured, time.perf_counter() - t0)
    settings = ServerSettings(model_name=path.name, api_key=args.api_key, max_queue=args.max_queue,
                              drain_timeout=args.drain_timeout, max_body_bytes=args.max_body_bytes,
                              metrics_auth=args.metrics_auth, max_perplexity_tokens=args.max_perplexity_tokens)
    app = create_app(engine, settings, load_chat_template(path, engine.special_tokens()))
    # uvicorn turns SIGTERM into a graceful shutdown: stop accepting while the app drains the
    # engine loop (bounded; server/graceful.py), then run the app's shutdown. Afterwards it restores
    # the handler it found and re-raises the signal; with the default handler that would kill the
    # process (exit -15) after a clean shutdown, so the handler it finds ignores it: we exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    serve(app, app.state.server.drain, args.drain_timeout, host=args.host, port=args.port,
          log_level=args.log_level)


COMMANDS = {"init": cmd_init, "pack": cmd_pack, "convert": cmd_convert, "generate": cmd_generate, "perplexity": cmd_perplexity,
            "train": cmd_train, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CheckpointError, RefCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
