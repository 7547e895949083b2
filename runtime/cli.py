"""`qmoe` command line. Each command parses options and calls the library; nothing heavy is
imported at module level, so `qmoe --help` is instant and the runtime commands work without torch."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

import click

from . import manifest as mf


_terminated: list[int] = []  # the signal that _terminate turned into SystemExit, if any


def _terminate(signum: int, frame: Any) -> None:
    _terminated.append(signum)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """For the commands that write a folder (export, tiny, triton): SIGTERM (timeout, kill, a
    container stop) unwinds like Ctrl-C, so the half-written output is removed. Not for the others: a
    Python handler waits for a long native call (a TensorRT build) to return; `serve` has its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit code 1 (a traceback with --debug);
    usage errors (bad options) into one line and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)  # --help and friends: their exit code
        except click.ClickException as e:
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `qmoe`: the help
                e.show()
                sys.exit(e.exit_code)
            hint = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001  (the boundary for every user-facing error)
            from .errors import QmoeError

            if _terminated:  # SIGTERM landed inside a library that turned our SystemExit into its own
                # error (torch: "could not determine the shape of object type ..."): still a termination
                click.echo("terminated", err=True)
                sys.exit(128 + _terminated[-1])
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, (QmoeError, OSError)):
                msg = f"{type(e).__name__}: {msg} (run with --debug for a traceback)"
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """qmoe: export, build and run Qwen2-MoE models with ONNX Runtime and TensorRT."""
    ctx.obj = {"debug": debug}


def sampling_options(f: Callable) -> Callable:
    """Sampling flags; those a model's generation_config.json sets default to its values (see
    --generation-config), the others to greedy decoding."""
    options = [
        click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=None,
                     help="0 = greedy. Default: generation_config.json's, else 0."),
        click.option("--top-k", type=int, default=None, help="0 = off. Default: generation_config.json's, else 0."),
        click.option("--top-p", type=float, default=None, help="Default: generation_config.json's, else 1."),
        click.option("--min-p", type=float, default=None, help="0 = off. Default: generation_config.json's, else 0."),
        click.option("--repetition-penalty", type=float, default=None,
                     help="Default: generation_config.json's, else 1."),
        click.option("--generation-config", "generation_config", type=click.Choice(["auto", "vllm"]), default="auto",
                     show_default=True,
                     help="auto: sampling defaults from the model's generation_config.json (as transformers and "
                          "vLLM use them); vllm: ignore it (greedy unless flags say otherwise)."),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True, help="OpenAI's, in [-2, 2]."),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True, help="OpenAI's, in [-2, 2]."),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def engine_options(f: Callable) -> Callable:
    f = click.option("--rope-scaling", "rope_mode", type=click.Choice(["none", "static", "dynamic"]), default=None,
                     help="YaRN mode; default: dynamic when the model has rope_scaling, else none.")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(f)
    f = click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
                     show_default=True)(f)
    return f


def speculative_option(f: Callable) -> Callable:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        from .speculative import NgramSpeculation

        return None if value is None else NgramSpeculation.from_config(value)

    return click.option("--speculative-config", "speculation", default=None, callback=parse,
                        help='n-gram speculative decoding, vLLM\'s JSON: {"method": "ngram", '
                             '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}.')(f)


def _sampling(kw: dict[str, Any], artifact: str) -> tuple[Any, list[str]]:
    """(SamplingParams from the flags, with the fields left out taken from the artifact's
    generation_config.json under --generation-config auto; the sampling flags given that change
    decoding, which beam search refuses: not --temperature 0 or --top-p 1)."""
    from pathlib import Path

    from .sampling import SAMPLING_FIELDS, SamplingParams, generation_defaults

    given = {k: kw.pop(k) for k in SAMPLING_FIELDS}
    use_file = kw.pop("generation_config") == "auto" and (Path(artifact) / "generation_config.json").is_file()
    # a file that does not ask for sampling leaves qmoe run greedy (transformers' do_sample default)
    defaults = generation_defaults(artifact, temperature=0.0) if use_file else {}
    chosen = {k: v for k, v in given.items() if v is not None}
    others = dict(presence_penalty=kw.pop("presence_penalty"), frequency_penalty=kw.pop("frequency_penalty"),
                  seed=kw.pop("seed"), stop=tuple(kw.pop("stop")))
    flags, neutral = SamplingParams(**chosen, **others), SamplingParams()
    sampled = [k for k in (*SAMPLING_FIELDS, *others) if getattr(flags, k) != getattr(neutral, k)]
    return SamplingParams(**{**defaults, **chosen}, **others, max_new_tokens=kw.pop("max_new_tokens")), sampled


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def tiny(out_dir: str, seed: int, dtype: str, force: bool) -> None:
    """Write the embedded default: a tiny random Qwen2-MoE checkpoint with the real Qwen2 tokenizer."""
    from exporter.tiny import tiny_config, write_checkpoint

    with _sigterm_cleans_up():
        write_checkpoint(out_dir, tiny_config(), seed=seed, dtype=dtype, force=force)
    click.echo(f"wrote {out_dir}")


@main.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to create.")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Default: float32 for onnxruntime, float16 for tensorrt.")
@click.option("--link-weights", is_flag=True,
              help="Hard-link checkpoint shards into the artifact instead of copying tensors that need no change.")
@click.option("--quantize", type=click.Choice(list(mf.QUANT_SCHEMES)), default=None,
              help="Weight-only quantization (onnxruntime target): linear layers, experts, embeddings and head; "
                   "the router stays float.")
@click.option("--quant-block-size", type=click.Choice([str(b) for b in mf.QUANT_BLOCK_SIZES]), default=None,
              help="Weights per scale along each row (default 32).")
@click.option("--quant-activations", type=click.Choice(list(mf.QUANT_ACTIVATIONS)), default=None,
              help="int8: also quantize activations on the fly (faster on CPU); default: float for int4, int8 for "
                   "int8 (the only choice there).")
@click.option("--lora", "lora", multiple=True, type=click.Path(),
              help="PEFT LoRA adapter folder to merge into the weights (repeat to add several).")
@click.option("--gate-up-block", type=click.IntRange(min=0), default=None,
              help="tensorrt target: gate/up weight rows in alternating blocks of this many rows (0: gate rows "
                   "then up rows, the default). 128 lets the Hopper kernels do SwiGLU inside their first GEMM "
                   "(not yet run on a GPU).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export(checkpoint_dir: str, output_dir: str, target: str, dtype: str | None, link_weights: bool,
           quantize: str | None, quant_block_size: str | None, quant_activations: str | None, lora: tuple[str, ...],
           gate_up_block: int | None, force: bool) -> None:
    """Export a Hugging Face Qwen2-MoE checkpoint to an ONNX artifact.

    A GPTQ checkpoint (e.g. Qwen2-57B-A14B-Instruct-GPTQ-Int4) keeps its quantized layers as they are
    (onnxruntime target; --quant-activations applies; --quantize [--quant-block-size] quantizes the
    layers it keeps float: embeddings, head)."""
    from tqdm import tqdm

    try:
        import exporter.export as ex
    except ImportError as e:
        raise click.ClickException(f"export needs the export extra ({e.name} missing): pip install 'qmoe[export]'")
    bar = tqdm(total=0, unit="B", unit_scale=True, desc="weights", disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        with _sigterm_cleans_up():
            ex.export(checkpoint_dir, output_dir, target=target, dtype=dtype, force=force,
                      link_weights=link_weights, quantize=quantize,
                      quant_block_size=None if quant_block_size is None else int(quant_block_size),
                      quant_activations=quant_activations, lora=lora,
                      progress=progress, gate_up_block=gate_up_block)
    finally:
        bar.close()
    for a in mf.read(output_dir).lora or []:  # what went into the weights, as the manifest records it
        click.echo(f"merged LoRA {a['path']} ({a['file']}, r={a['r']}, lora_alpha={a['lora_alpha']}, "
                   f"{a['layers']} adapted weights or expert groups, sha256 {a['sha256'][:12]})")
    click.echo(f"wrote {output_dir}")


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--plugin-lib", type=click.Path(dir_okay=False), default=None,
              help="libqmoe_trt_plugins.so (scripts/build_plugins.sh); default: $QMOE_TRT_PLUGIN_LIB.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Longest prompt + new tokens; default: min(4096, the model's limit).")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None, help="Batch to tune for; default: --max-batch.")
@click.option("--max-prefill", type=click.IntRange(min=1), default=None,
              help="Longest prefill chunk (tokens per step); default: min(2048, --max-context), the runtime's chunk.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache reused and updated across builds; default: ARTIFACT/timing.cache.")
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="TensorRT workspace limit; default: TensorRT's.")
@click.option("--weak-typing", is_flag=True,
              help="TensorRT 10.x: let TensorRT pick precisions (FP16/BF16 flag) instead of the graph's types.")
def build(artifact: str, plugin_lib: str | None, max_batch: int, max_context: int | None, opt_batch: int | None,
          max_prefill: int | None, timing_cache: str | None, workspace_gb: float | None, weak_typing: bool) -> None:
    """Build ARTIFACT/model.engine with TensorRT from an artifact exported with --target tensorrt."""
    from .trt.build import BuildOptions, build as build_engine

    options = BuildOptions(plugin_lib, max_batch, max_context, opt_batch, max_prefill, timing_cache, workspace_gb,
                           weak_typing)
    path = build_engine(artifact, options, progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {path}")


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path())
@click.option("--backends", default=None,
              help="Comma-separated, from onnxruntime,tensorrt; default: every available one the artifacts are for.")
@click.option("--reference", type=click.Path(file_okay=False), default=None,
              help="Checkpoint folder: compare with transformers (needs torch, transformers).")
@click.option("--prompts", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--atol", type=float, default=None,
              help="Max |delta| of logits; default by dtype: float32 1e-3, float16 5e-2, bfloat16 0.25.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def check(artifacts: tuple[str, ...], backends: str | None, reference: str | None, prompts: int,
          max_new_tokens: int, atol: float | None, device: str) -> None:
    """Compare logits, top-1 and greedy tokens of ARTIFACTS across backends and with transformers."""
    from .check import check as run_check

    names = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    report = run_check(artifacts, names, reference, prompts, max_new_tokens, atol, device,
                       progress=lambda msg: click.echo(msg, err=True))
    click.echo(report.table())
    if not report.ok:
        failed = ", ".join(f"{c.run} vs {c.baseline}" for c in report.comparisons if not c.ok)
        click.echo(f"error: check failed: {failed}", err=True)
        sys.exit(1)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat/--raw", "as_chat", default=True, show_default=True,
              help="Wrap the prompt in the chat template (default) or complete it as raw text.")
@click.option("--json-schema", default=None, help="Constrain the output to this JSON schema (a file or inline JSON).")
@click.option("--regex", default=None, help="Constrain the output to this regular expression.")
@click.option("--choice", multiple=True, help="Constrain the output to one of these strings (repeatable).")
@click.option("--num-beams", type=int, default=None,
              help="Beam search with this many beams (transformers' semantics; ONNX Runtime CPU) instead of sampling.")
@click.option("--length-penalty", type=float, default=1.0, show_default=True,
              help="Beam search: scores are sum(logprob) / length ** this.")
@click.option("--early-stopping", type=click.Choice(["false", "true", "never"]), default="false", show_default=True,
              help="Beam search: when to stop (transformers' early_stopping).")
@click.option("--num-return-sequences", type=int, default=1, show_default=True,
              help="Beam search: print this many of the best beams, with their scores.")
@sampling_options
@speculative_option
@engine_options
def run(artifact: str, prompt: str, as_chat: bool, json_schema: str | None, regex: str | None,
        choice: tuple[str, ...], num_beams: int | None, length_penalty: float, early_stopping: str,
        num_return_sequences: int, speculation: Any, backend: str, device: str, rope_mode: str | None,
        **kw: Any) -> None:
    """Generate a completion for one prompt, streamed to stdout."""
    from dataclasses import replace
    from pathlib import Path

    from .engine import load
    from .structured import StructuredOutput, StructuredOutputError

    sampling, sampled = _sampling(kw, artifact)
    if num_beams is not None:
        _beam_run(artifact, prompt, as_chat, sampling, sampled, num_beams, length_penalty, early_stopping,
                  num_return_sequences, bool(json_schema or regex or choice), speculation, backend, device, rope_mode)
        return
    if num_return_sequences != 1 or length_penalty != 1.0 or early_stopping != "false":
        raise click.UsageError("--length-penalty, --early-stopping and --num-return-sequences need --num-beams")
    asked = [name for name, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice or None))
             if v is not None]
    if len(asked) > 1:
        raise StructuredOutputError(f"give one of --json-schema, --regex, --choice, not {' and '.join(asked)}")
    if json_schema is not None:
        text = json_schema
        if not json_schema.lstrip().startswith("{") and json_schema.strip() not in ("true", "false"):  # a file
            try:
                text = Path(json_schema).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise StructuredOutputError(f"--json-schema: {json_schema} is not inline JSON and cannot be read "
                                            f"({type(e).__name__})") from None
        try:
            sampling = replace(sampling, structured=StructuredOutput.json_schema(text))
        except StructuredOutputError as e:
            raise StructuredOutputError(f"--json-schema: {e}") from None
    elif regex is not None:
        sampling = replace(sampling, structured=StructuredOutput.regex(regex))
    elif choice:
        sampling = replace(sampling, structured=StructuredOutput.choice(list(choice)))
    engine = load(artifact, backend=backend, device=device, rope_mode=rope_mode)
    if speculation is not None:  # drafts are verified by the batching scheduler's steps
        from .batching import BatchScheduler, stream

        ids = _prompt_ids(engine, prompt, as_chat)
        scheduler = BatchScheduler(engine, max_slots=1, capacity=max(2, len(ids) + sampling.max_new_tokens),
                                   speculation=speculation)
        deltas = stream(scheduler, ids, sampling)
    elif as_chat:
        deltas = engine.chat([{"role": "user", "content": prompt}], sampling, stream=True)
    else:
        deltas = engine.complete(prompt, sampling, stream=True)
    for delta in deltas:
        click.echo(delta, nl=False)
    click.echo()


def _prompt_ids(engine: Any, prompt: str, as_chat: bool) -> list[int]:
    """qmoe run's prompt as token ids: in the chat template as one user turn, or raw."""
    from .engine import RequestError

    tok = engine.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if as_chat else tok.encode(prompt)
    if not ids:
        raise RequestError("the prompt is empty")
    return ids


def _beam_run(artifact: str, prompt: str, as_chat: bool, sampling: Any, sampled: list[str], num_beams: int,
              length_penalty: float, early_stopping: str, num_return_sequences: int, structured: bool,
              speculation: Any, backend: str, device: str, rope_mode: str | None) -> None:
    """qmoe run --num-beams: the best beam's text (or the best n, each with its score). `sampled`:
    the sampling flags given that change decoding (generation_config.json's sampling defaults do not
    apply to beams, as in vLLM's beam search)."""
    from .beam import BeamSearchError, BeamSearchParams, beam_search
    from .engine import load

    if sampled or structured or speculation is not None:
        what = ", ".join(f"--{n.replace('_', '-')}" for n in sampled) or \
            ("--speculative-config" if speculation is not None else "structured output")
        raise BeamSearchError(f"beam search is deterministic and unconstrained: it does not take {what}")
    params = BeamSearchParams(num_beams=num_beams, max_new_tokens=sampling.max_new_tokens,
                              length_penalty=length_penalty,
                              early_stopping={"false": False, "true": True}.get(early_stopping, early_stopping),
                              num_return_sequences=num_return_sequences)
    engine = load(artifact, backend=backend, device=device, rope_mode=rope_mode)
    beams = beam_search(engine, _prompt_ids(engine, prompt, as_chat), params)
    if num_return_sequences == 1:
        click.echo(beams[0].text)
        return
    for i, b in enumerate(beams):
        click.echo(f"[{i}] score {b.score:.4f} ({b.finish_reason}, {len(b.tokens)} tokens): {b.text}")


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--system", default=None, help="System prompt (default: the chat template's).")
@sampling_options
@speculative_option
@engine_options
def chat(artifact: str, system: str | None, speculation: Any, backend: str, device: str, rope_mode: str | None,
         **kw: Any) -> None:
    """Interactive chat: keeps history; /reset clears it; Ctrl-D exits. Each turn reuses the K/V of
    the conversation so far and prefills only the new turn."""
    from .batching import BatchScheduler, stream
    from .engine import RequestError, load

    sampling, _ = _sampling(kw, artifact)
    engine = load(artifact, backend=backend, device=device, rope_mode=rope_mode)
    scheduler = BatchScheduler(engine, max_slots=1, speculation=speculation)
    if sampling.max_new_tokens >= scheduler.capacity:  # every turn would be refused: say so once, up front
        raise RequestError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the "
                           f"{scheduler.capacity}-token context; lower it")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    base = list(history)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = list(base)
            click.echo("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for delta in stream(scheduler, engine.tokenizer.encode_chat(history), sampling):
                click.echo(delta, nl=False)
                reply.append(delta)
        except Exception as e:  # noqa: BLE001  (keep the session alive on a bad turn)
            history.pop()
            click.echo(f"error: {str(e).splitlines()[0]}", err=True)
            continue
        click.echo()
        history.append({"role": "assistant", "content": "".join(reply)})


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes the server).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="Model id clients send (default: the artifact folder name).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests that share decode steps (continuous batching); 1 serves one at a time.")
@click.option("--max-context", "capacity", type=click.IntRange(min=2), default=None,
              help="Tokens per request (prompt + max_tokens) the KV cache holds "
                   "[default: min(the model's context, 32768)].")
@click.option("--chat-template", default=None,
              help="A Jinja chat template (file, or the template itself) instead of the artifact's.")
@click.option("--max-num-batched-tokens", "max_step_tokens", type=click.IntRange(min=1), default=None,
              help="The most tokens one step runs (decoding requests first, then prompt chunks), >= --max-batch; "
                   "bounds the inter-token latency a long prompt's prefill adds [default: no limit].")
@click.option("--api-key", envvar="QMOE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request but /health and /metrics "
                   "[env QMOE_API_KEY].")
@click.option("--scheduling-policy", "policy", type=click.Choice(["fcfs", "priority"]), default="fcfs",
              show_default=True, help="Waiting requests in arrival order, or by their `priority` field (lower first).")
@speculative_option
@engine_options
def serve(artifact: str, host: str, port: int, served_model_name: str | None, max_batch: int, capacity: int | None,
          chat_template: str | None, max_step_tokens: int | None, api_key: str | None, policy: str, speculation: Any,
          backend: str, device: str, rope_mode: str | None) -> None:
    """Serve the OpenAI API (/v1/models, /v1/chat/completions, /v1/completions) over HTTP."""
    try:
        from .serve import serve as run_server
    except ImportError as e:
        raise click.ClickException(f"serve needs the serve extra ({e.name} missing): pip install 'qmoe[serve]'")
    run_server(artifact, host=host, port=port, served_model_name=served_model_name, backend=backend, device=device,
               rope_mode=rope_mode, max_batch=max_batch, capacity=capacity, chat_template=chat_template,
               speculation=speculation, max_step_tokens=max_step_tokens, api_key=api_key, policy=policy)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", "repo_dir", required=True, type=click.Path(file_okay=False),
              help="Model repository to write into (created if missing; other models in it are kept).")
@click.option("--name", default="qwen2_moe", show_default=True, help="Model name in the repository.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances: each is its own process with its own engine.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Triton instance kind; gpu runs the engine on CUDA.")
@click.option("--copy/--link", "copy", default=False, show_default=True,
              help="Copy the artifact into the repository, or reference it by absolute path.")
@click.option("--python-env", default=None, type=click.Path(file_okay=False),
              help="Environment with qmoe that the backend stub activates (EXECUTION_ENV_PATH); "
                   "default: the current virtualenv; 'none': the server's python3.")
@click.option("--max-tokens", "default_max_tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="max_tokens of requests that set none.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests that share a step in each instance (continuous batching).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Tokens per request (prompt + max_tokens) the KV cache holds "
                   "[default: min(the model's context, 32768)].")
@click.option("--speculative-config", default=None, help="n-gram speculative decoding, vLLM's JSON (see qmoe serve).")
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
              help="The most tokens one step runs (see qmoe serve) [default: no limit].")
@click.option("--force", is_flag=True, help="Replace the model if the repository has it.")
def triton(artifact: str, repo_dir: str, name: str, instances: int, kind: str, copy: bool, python_env: str | None,
           default_max_tokens: int, max_batch: int, max_context: int | None, speculative_config: str | None,
           max_num_batched_tokens: int | None, force: bool) -> None:
    """Write a Triton model repository that serves ARTIFACT (python backend, streaming, continuous batching)."""
    from .triton import ModelSpec, current_python_env, write_repository

    env = None if python_env == "none" else (python_env or current_python_env())
    spec = ModelSpec(name, instances, kind, copy, env, default_max_tokens,  # type: ignore[arg-type]
                     max_batch, max_context, speculative_config, max_num_batched_tokens)
    with _sigterm_cleans_up():
        model_dir = write_repository(artifact, repo_dir, spec, force=force)
    click.echo(f"wrote {model_dir}; start the server as {model_dir.parent / 'README.md'} says")


@main.command()
@click.argument("url")
@click.option("--model", default=None, help="Model name to send [default: the server's first in /v1/models].")
@click.option("--num-prompts", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--input-len", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens (random token ids).")
@click.option("--output-len", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens each request generates (eos ignored).")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests in flight.")
@click.option("--request-rate", type=float, default=float("inf"), show_default=True,
              help="Requests per second (Poisson arrivals); inf sends them as fast as --concurrency allows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-result", type=click.Path(dir_okay=False), default=None,
              help="Write the summary and every request's timings as JSON.")
@click.option("--api-key", envvar="QMOE_API_KEY", default=None, help="Bearer token the server wants [env QMOE_API_KEY].")
def bench(url: str, model: str | None, num_prompts: int, input_len: int, output_len: int, concurrency: int,
          request_rate: float, seed: int, save_result: str | None, api_key: str | None) -> None:
    """Load an OpenAI-compatible server at URL (qmoe serve, vLLM, ...) with streamed completions and
    print throughput and TTFT / TPOT / ITL / end-to-end latency percentiles."""
    from pathlib import Path

    from .bench import report, run, to_json

    summary = run(url, model, num_prompts, input_len, output_len, concurrency, request_rate, seed, api_key=api_key)
    click.echo(report(summary))
    if save_result is not None:
        Path(save_result).write_text(to_json(summary), encoding="utf-8")
    if summary["failed"]:
        from .bench import BenchError

        raise BenchError(f"{summary['failed']} of {num_prompts} requests failed; the first: {summary['first_error']}")


if __name__ == "__main__":
    main()
