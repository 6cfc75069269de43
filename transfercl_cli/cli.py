"""The `tcl` command line: parses arguments, calls the library, prints. The work happens in the library modules."""
import contextlib
import json
import os
import sys
import traceback

import click

from . import __version__
from .errors import TclError


class _State:
    verbose = False


def _fail(e, verbose):
    if verbose:
        traceback.print_exc()
    msg = str(e) if isinstance(e, TclError) else f"{type(e).__name__}: {e}"
    click.echo(f"Error: {msg}", err=True)
    sys.exit(getattr(e, "exit_code", 1))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line on stderr: 'note: ...' for what tcl tells the user (TclNote), 'warning: ...' else."""
    from .errors import TclNote

    kind = "note" if issubclass(category, TclNote) else "warning"
    click.echo(f"{kind}: {message}", err=True)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM (a cron or job-scheduler time-out, `kill`) stops a run like Ctrl-C: the run directory records
    'interrupted' and keeps its last finished epoch, instead of dying mid-step."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class TclGroup(click.Group):
    """Turns TclError (and out-of-memory) into one paragraph on stderr and exit code 2; --verbose shows the trace."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TclError as e:
            _fail(e, _State.verbose)
        except MemoryError:
            _fail(TclError("The host ran out of memory.", "Lower train.batch_size or freeze more layers."), _State.verbose)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except OSError as e:
            _fail(TclError(f"A file operation failed: {e}.",
                           "Check that the path exists, is readable, and that the output folder is writable and "
                           "has free space."), _State.verbose)
        except Exception as e:  # noqa: BLE001 - a bug: one paragraph, exit 1, trace with --verbose
            err = TclError(f"Internal error ({type(e).__name__}: {e}).",
                           "This is a bug in tcl: rerun with --verbose and report the traceback.")
            err.exit_code = 1
            _fail(err, _State.verbose)


@click.group(cls=TclGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tcl")
@click.option("--verbose", is_flag=True, help="Show full tracebacks on errors.")
def main(verbose):
    """TransferCL: fine-tune pretrained networks (Keras .h5, ONNX) on any OpenCL device."""
    import warnings

    _State.verbose = verbose
    warnings.showwarning = _show_warning
    from .errors import TclNote

    warnings.simplefilter("always", TclNote)  # each command's notes, even when a process runs several commands


def model_options(f):
    """--config and --input-size, for models that need them (weights-only .h5, dynamic input size)."""
    f = click.option("--input-size", type=int, nargs=2, metavar="H W",
                     help="Input height and width, for models whose input size is not fixed.")(f)
    f = click.option("--config", "model_config", type=click.Path(dir_okay=False),
                     help="Keras model config JSON, for a weights-only .h5 file.")(f)
    return f


def preprocess_options(f):
    """--mean/--std/--scale/--offset/--resize/--channel-order: the recipe's `input` keys, for models whose file does
    not say how images were prepared (a torchvision ONNX export wants ImageNet mean/std, not [-1, 1])."""
    numbers = lambda name: click.option(  # noqa: E731
        f"--{name}", type=str, metavar="X[,X,X]",
        help=f"As the recipe's input.{name}: one number or three, comma-separated.")
    for name in ("offset", "scale", "std", "mean"):
        f = numbers(name)(f)
    f = click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), help="As the recipe's input.channel_order.")(f)
    f = click.option("--resize", type=click.Choice(["shorter_crop", "stretch"]), help="As the recipe's input.resize.")(f)
    return f


def _numbers(v):
    if v is None:
        return None
    parts = [p.strip() for p in v.split(",")]
    return parts[0] if len(parts) == 1 else parts


def _preprocess_flags(recipe, mean, std, scale, offset, resize, channel_order):
    from .evaluate import input_overrides

    return input_overrides(recipe, mean=_numbers(mean), std=_numbers(std), scale=_numbers(scale),
                           offset=_numbers(offset), resize=resize, channel_order=channel_order)


class _StageBars:
    """A progress callback `(stage, done, total)` drawn as one bar per stage, on a terminal only (tqdm with
    disable=None: nothing when stderr is a log, a pipe or a test runner)."""

    UNITS = {"calibration images": "img", "activation ranges": "img", "int8 sensitivity": "layer",
             "test accuracy": "pass"}

    def __init__(self):
        self.stage, self.bar = None, None

    def __call__(self, stage, done, total):
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit=self.UNITS.get(stage, "it"), disable=None, leave=False,
                            dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None


DEVICE_HELP = ("OpenCL device: an id (0:1), a type (gpu, cpu), part of a platform/device name (pocl, adreno), or "
               "'numpy' for the slow reference fallback. Default: $TCL_DEVICE, else the first GPU, else the first CPU.")


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def devices(as_json):
    """List OpenCL platforms and devices with their selector ids."""
    from .runtime import compiler_error, list_devices, select_device

    devs = list_devices()
    try:
        default = select_device(None, devs)
    except TclError:
        default = None
    builds = {d.id: compiler_error(d) is None for d in devs}
    if as_json:
        click.echo(json.dumps([dict(d.as_dict(), default=(d is default), compiles=builds[d.id]) for d in devs],
                              indent=2))
        return
    for d in devs:
        mark = "*" if d is default else " "
        click.echo(f"{mark} {d.id}  {d.name}  [{d.type}]  platform: {d.platform_name}")
        click.echo(f"      compute units {d.compute_units}, global memory {_human_bytes(d.global_mem)}, "
                   f"local memory {_human_bytes(d.local_mem)}, max work-group {d.max_work_group_size}")
        click.echo(f"      {d.opencl_c_version}, fp16 {'yes' if d.fp16 else 'no'}, fp64 {'yes' if d.fp64 else 'no'}, "
                   f"driver {d.driver_version}")
        if not builds[d.id]:
            click.echo("      its OpenCL compiler cannot build a kernel here: `tcl doctor` says why and how to fix it")
    click.echo("(* = default; choose with --device ID or TCL_DEVICE. fp16/fp64: half/double arithmetic; "
               "precision: fp16 storage works on every device)")



@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--lr", type=float, help="Override train.lr.")
@click.option("--batch-size", type=int, help="Override train.batch_size.")
@click.option("--optimizer", type=str, help="Override train.optimizer.")
@click.option("--seed", type=int, help="Override train.seed (and data.seed).")
@click.option("--data", "data_root", type=str, help="Override data.root.")
@click.option("--model", type=str, help="Override model.")
@click.option("--device", type=str, help=DEVICE_HELP)
@click.option("--output", "-o", type=str, help="Override output (the run directory).")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory from its last checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (frozen, cut, added, cached, memory) and stop.")
@click.option("--force", is_flag=True, help="Replace a run already in the output directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or per-epoch lines (for cron and scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def finetune(recipe, epochs, lr, batch_size, optimizer, seed, data_root, model, device, output, resume, dry_run,
             force, quiet, as_json):
    """Fine-tune a pretrained model as a YAML RECIPE describes; writes a run directory with weights and reports."""
    from .recipe import load_recipe
    from .train import finetune as run

    overrides = {"train.epochs": epochs, "train.lr": lr, "train.batch_size": batch_size, "train.optimizer": optimizer,
                 "train.seed": seed, "data.seed": seed, "device": device,
                 # Paths given on the command line are relative to the current folder, not the recipe's.
                 "data.root": data_root and os.path.abspath(data_root), "model": model and os.path.abspath(model),
                 "output": output and os.path.abspath(output)}
    r = load_recipe(recipe, overrides)
    echo = (lambda *a: None) if (quiet or as_json) else (lambda m: click.echo(m))
    with _sigterm_as_ctrl_c():
        res = run(r, resume=resume, dry_run=dry_run, quiet=quiet or as_json, log=echo, force=force)
    if as_json:
        from .report import SCHEMA_VERSION

        click.echo(json.dumps(res if dry_run else {"schema_version": SCHEMA_VERSION, "run_dir": res["run_dir"],
                                                    "metrics": res["metrics"], "meta": res["meta"]},
                              indent=2, default=str))
    elif quiet and not dry_run:
        m = res["metrics"]
        click.echo(f"{res['run_dir']}: accuracy {m['accuracy']:.4f} on {res['meta']['split']}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--data", type=click.Path(), help="Image folder (one sub-folder per class). Default: the run's data.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe giving data split and preprocessing.")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), help="Which split to measure.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one per line, in output order.")
@click.option("--device", type=str, help=DEVICE_HELP)
@click.option("--output", "-o", type=click.Path(), help="Folder for report.json/report.md/PNGs (default: the run).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@model_options
@preprocess_options
def evaluate(model, data, recipe, split, labels, device, output, batch_size, as_json, model_config, input_size,
             mean, std, scale, offset, resize, channel_order):
    """Measure a model or run directory on labelled images: accuracy, per-class scores, confusion matrix."""
    from .evaluate import evaluate as run
    from .report import format_table

    pre = _preprocess_flags(None, mean, std, scale, offset, resize, channel_order)
    metrics, meta = run(model, data=data, recipe=recipe, split=split, device=device, labels=labels, out_dir=output,
                        batch_size=batch_size, preprocess=pre, config=model_config, input_size=input_size or None)
    if as_json:
        from .report import SCHEMA_VERSION

        click.echo(json.dumps({"schema_version": SCHEMA_VERSION, "metrics": metrics, "meta": meta}, indent=2,
                              default=str))
    else:
        click.echo(format_table(metrics))
        click.echo(f"{meta['split']} split, {meta['images_per_sec']} images/s on {meta['device']}")


@main.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), help="Class names, one per line, in output order.")
@click.option("--top", "-k", type=int, default=5, show_default=True)
@click.option("--device", type=str, help=DEVICE_HELP)
@click.option("--recipe", type=click.Path(dir_okay=False), help="Take the preprocessing from a recipe's `input`.")
@click.option("--json", "as_json", is_flag=True)
@model_options
@preprocess_options
def predict(model, images, labels, top, device, recipe, as_json, model_config, input_size, mean, std, scale, offset,
            resize, channel_order):
    """Top-K classes with probabilities for each image or folder of images (a model file or a fine-tuned run
    directory)."""
    from .evaluate import predict as run

    pre = _preprocess_flags(recipe, mean, std, scale, offset, resize, channel_order)
    res = run(model, list(images), labels=labels, top=top, device=device, preprocess=pre, config=model_config,
              input_size=input_size or None)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for r in res:
            click.echo(r["image"])
            if "error" in r:
                click.echo(f"  unreadable: {r['error']}")
                continue
            for t in r["top"]:
                click.echo(f"  {t['probability']:7.4f}  {t['index']:>5}  {t['label']}")
    failed = [r for r in res if "error" in r]
    if failed:
        from .data import summarize_bad

        shown = summarize_bad([(r["image"], r["error"]) for r in failed])
        click.echo(f"Error: {len(failed)} of {len(res)} images could not be read: {shown}. Re-export or delete "
                   "those files; the other images' predictions are above.", err=True)
        sys.exit(2)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--recipe", type=click.Path(dir_okay=False), help="Show which layers a recipe freezes, trains, cuts, adds.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="For the training memory estimate.")
@click.option("--cut-points", is_flag=True, help="List only the sensible `cut_after` layers (the input of the old "
              "classifier, the ends of the last blocks, the last block at each resolution) with their positions.")
@click.option("--json", "as_json", is_flag=True)
@model_options
def inspect(model, recipe, batch_size, cut_points, as_json, model_config, input_size):
    """Table of layers: name, type, output shape, parameters, multiply-adds; totals and memory estimate."""
    from .inspect_model import inspect_cut_points, inspect_model

    if cut_points:
        res = inspect_cut_points(model, config=model_config, input_size=input_size or None)
    else:
        res = inspect_model(model, recipe=recipe, batch_size=batch_size, config=model_config,
                            input_size=input_size or None)
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
    else:
        click.echo(res["text"])


@main.command()
@click.argument("data_dir", type=click.Path())
@click.option("--model", "-m", required=True, type=click.Path(),
              help="The pretrained model: a Keras .h5, an ONNX file or a tcl run directory.")
@click.option("-o", "--output", default="recipe.yaml", show_default=True, type=click.Path(),
              help="The recipe file to write.")
@click.option("--force", is_flag=True, help="Replace an existing recipe file.")
@click.option("--device", type=str, help=DEVICE_HELP + " (for the memory budget; written into the recipe)")
@click.option("--json", "as_json", is_flag=True, help="Print what was found and chosen as JSON.")
@model_options
def init(data_dir, model, output, force, device, as_json, model_config, input_size):
    """Look at DATA_DIR (one sub-folder per class) and MODEL, and write a commented starting recipe: the cut before
    the old classifier, what trains for this much data, a validation split with early stopping, the preprocessing
    and a batch size that fits the memory budget."""
    from .init_recipe import init_recipe
    from .report import format_preprocess

    s = init_recipe(data_dir, model, output, force=force, device=device, config=model_config,
                    input_size=input_size or None)
    if as_json:
        click.echo(json.dumps(s, indent=2, default=str))
        return
    counts = ", ".join(f"{c} {n}" for c, n in list(zip(s["classes"], s["images_per_class"]))[:8])
    more = f", ... ({len(s['classes']) - 8} more)" if len(s["classes"]) > 8 else ""
    sp = s["splits"]
    click.echo(f"wrote {output}")
    click.echo(f"  data     {len(s['classes'])} classes ({counts}{more}); train {sp['train']}, val {sp['val']}, "
               f"test {sp['test']}" + (f"; {len(s['unreadable'])} unreadable (skipped)" if s["unreadable"] else ""))
    click.echo("  cut      " + (f"after {s['cut_after']}" if s["cut_after"] else "none")
               + f"; new head {', '.join(h if isinstance(h, str) else next(iter(h)) for h in s['head'])}")
    trains = ("the new head only" if s["head_only"] else f"{', '.join(s['unfreeze'])} and the new head")
    click.echo(f"  trains   {trains} ({s['train_images_per_class']:g} training images per class)")
    click.echo(f"  batch    {s['batch_size']} (a step needs about {s['memory_bytes'] / 2**20:.0f} MiB of the "
               f"{s['budget_bytes'] / 2**20:.0f} MiB budget on {s['device']})")
    click.echo(f"  input    {format_preprocess(s['input'])}")
    click.echo(f"check the lines marked CHECK in {output}, then: tcl finetune {output} --dry-run")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--batch", "batches", type=int, nargs=2, default=(1, 8), show_default=True, metavar="SMALL LARGE",
              help="Batch size of the latency and of the throughput (and training step) measurements.")
@click.option("--runs", type=int, default=10, show_default=True, help="Timed runs of each measurement (medians).")
@click.option("--train", is_flag=True, help="Also time a training step of a typical recipe (last block + new head).")
@click.option("--device", type=str, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@model_options
def bench(models, batches, runs, train, device, as_json, model_config, input_size):
    """Speed of each MODEL on the device: kernel warm-up, forward latency at batch 1, throughput at a larger batch,
    with --train a training step; peak memory. One row per model (each in its own process when there are several)."""
    from .bench_models import bench as run, format_rows

    rows = run(list(models), batches=batches, runs=runs, train=train, device=device, config=model_config,
               input_size=input_size or None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(format_rows(rows))


@main.command("export-weights")
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "h5", "npz"]), required=True)
@click.option("-o", "--output", type=click.Path(), help="Output file (default: RUN_DIR/export/model.FORMAT).")
@click.option("--int8", is_flag=True, help="int8 quantization: per-channel symmetric weights and, for ONNX, "
              "calibrated activations (accuracy change measured).")
@click.option("--int8-activations/--no-int8-activations", default=None,
              help="With --int8 --format onnx: quantize the activations too (static int8, QDQ: onnxruntime runs "
                   "integer kernels; the default), or only the weights.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.option("--weights", type=click.Choice(["best", "final"]), default="best", show_default=True)
@click.option("--int8-threshold", type=float, default=0.25, show_default=True, metavar="POINTS",
              help="With --int8: layers whose quantization alone costs more accuracy points than this on the "
                   "training split stay float.")
@click.option("--device", type=str, help=DEVICE_HELP + " (for the int8 accuracy check)")
@click.option("--json", "as_json", is_flag=True)
def export_weights(run_dir, fmt, output, int8, int8_activations, force, weights, int8_threshold, device, as_json):
    """Write a fine-tuned run's weights as ONNX, Keras-layout HDF5 or npz."""
    from .export_run import export_run

    bars = _StageBars()
    try:
        res = export_run(run_dir, fmt, output=output, int8=int8, force=force, weights=weights, device=device,
                         int8_threshold=int8_threshold, progress=bars, int8_activations=int8_activations)
    finally:
        bars.close()
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"wrote {res['path']}")
    if res.get("int8"):
        q = res["int8"]
        kept = q["kept_float"]
        click.echo(f"int8: test accuracy {q['accuracy_fp32']:.4f} -> {q['accuracy_int8']:.4f} "
                   f"({q['accuracy_change']:+.4f}); kept float: {', '.join(kept) if kept else 'none'}; details in "
                   f"{q['report']}")
        if "accuracy_int8_onnxruntime" in q:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(q["onnxruntime_integer_ops"].items())) or "none"
            click.echo(f"int8 in onnxruntime {q['onnxruntime_version']}: test accuracy "
                       f"{q['accuracy_int8_onnxruntime']:.4f}, top-1 agreement with tcl "
                       f"{q['onnxruntime_top1_agreement']:.4f}; integer kernels: {ops}")


@main.command()
@click.option("--device", type=str, help=DEVICE_HELP + " (default: check every device)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--selftest", is_flag=True,
              help="Also run a small network's forward and one training step on each device and compare them with "
              "the numpy reference (pass/fail per device).")
def doctor(device, as_json, selftest):
    """Check Python packages, OpenCL libraries, devices, kernel builds and the cache; explain any fix."""
    from .doctor import run_checks

    checks = run_checks(device, selftest=selftest)
    ok = checks[-1].ok
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"[{'ok' if c.ok else '!!'}] {c.name}: {c.detail}")
            if c.fix and not c.ok:
                click.echo(f"     fix: {c.fix}")
    sys.exit(0 if ok else 2)


from .cli_federate import federate  # noqa: E402 - the group's commands live beside it; flwr loads on use

main.add_command(federate)


if __name__ == "__main__":  # pragma: no cover
    main()
