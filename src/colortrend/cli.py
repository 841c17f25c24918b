"""The ``colortrend`` command: parse arguments, call the library, turn its typed errors into one line + exit code.

Exit codes: 0 done (photos that could not be analysed are rows with a status, not failures of the run);
1 unexpected error; 2 invalid config, inputs or environment (nothing written); 3 another run holds the output.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from colortrend import __version__
from colortrend.errors import ENVIRONMENT_ERRORS, ColortrendError, ConfigError, environment_problem

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class Stopped(BaseException):
    """A stop signal (SIGTERM) received during a run; a BaseException, like KeyboardInterrupt, so that no
    per-photo error handler takes it for a bad photo."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, _frame) -> None:
    raise Stopped(signum)


class Commands(click.Group):
    """Every command's library errors, bad arguments and environment failures become one line on stderr and an
    exit code, never a traceback (subcommands are parsed and run inside ``invoke``, so one place covers all)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ColortrendError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} -h`)" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRORS:
                raise
            click.echo(f"Error: {environment_problem(exc)}", err=True)
            ctx.exit(2)


def writable(option: str, path: str | None, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or a ``folder`` that may be created) cannot be written: an
    evaluation must not run for minutes and then fail on its last line."""
    if path is None:
        return
    target = os.path.abspath(path)
    if os.path.exists(target) and os.path.isdir(target) != folder:
        raise ConfigError(f"{option}: {path} is a {'file' if folder else 'folder'}")
    parent = target if folder else os.path.dirname(target)
    while folder and not os.path.exists(parent):  # a folder is created with its parents; a file is not
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}: cannot write {path} ({parent} is not a writable folder)")


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the metrics as one JSON object on the last line.")


def split_option(trainer: str):
    return click.option("--split", type=click.Choice(["all", "train", "val"]), default="all", show_default=True,
                        help=f"Photos of LABELS to score (val = the split `train {trainer}` holds out).")


eval_config_option = click.option("--config", "config", type=click.Path(exists=True, dir_okay=False),
                                  help="Analyse with this run config's settings (default: a run's defaults).")


def load(config: str, **overrides):
    from colortrend.config import load_config

    return load_config(config, {k: v for k, v in overrides.items() if v is not None})


@click.group(cls=Commands, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="colortrend")
@click.option("-v", "--verbose", is_flag=True, help="Log each step (recovery, retries, stage timings).")
def main(verbose: bool) -> None:
    """Which clothing colours does each age group and birth cohort wear? Measured from photos of people."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where shards run: this process, or a Ray cluster.")
@click.option("--address", help="Ray cluster address (default: start a local Ray instance).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override the config's device.")
@click.option("--full", is_flag=True, help="Reanalyse every photo, even those already committed.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: only on a terminal).")
def run(config: str, executor: str, address: str | None, device: str | None, full: bool, progress: bool | None):
    """Analyse new photos of CONFIG and rebuild the histograms and the report."""
    from colortrend.run import committed_photos, run as run_pipeline

    cfg = load(config, device=device)
    # SIGTERM (cron, systemd, Kubernetes) stops a run like Ctrl-C: the lock is released on the way out, what was
    # committed stays committed, and the next run resumes from there.
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        summary = run_pipeline(cfg, executor=executor, full=full, address=address, progress=progress)
    except (KeyboardInterrupt, Stopped) as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        click.echo(f"Stopped by {signal.Signals(signum).name}: {committed_photos(cfg.output):,} photos committed; "
                   "run the same command again to resume.", err=True)
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(f"{cfg.name}: {summary.line()}; report {cfg.output}/report/index.html ({summary.aggregates})")


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config: str, as_json: bool):
    """What is committed, pending, stale and failed for CONFIG (loads no model)."""
    from colortrend.run import status as run_status

    info = run_status(load(config))
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    click.echo(f"output            {info['output']}")
    click.echo(f"inputs            {info['inputs']} files")
    click.echo(f"committed         {info['photos_committed']} photos in {info['shards_committed']} shards")
    click.echo(f"pending           {info['photos_pending']} photos ({info['shards_stale']} stale shards to redo, "
               f"{info['photos_changed']} changed files)")
    for shard_id, problem in info["shards_damaged"].items():
        click.echo(f"damaged shard     {shard_id}: {problem} (the next run redoes it)")
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(info["photos_by_status"].items(), key=lambda kv: -kv[1]))
    click.echo(f"photos by status  {statuses or '-'}")
    click.echo(f"faces / persons   {info['faces']} / {info['persons']}")
    click.echo(f"failure logs      {len(info['failure_logs'])} (in {info['output']}/_logs)")
    click.echo(f"running now       {info['running'] or 'no'}")
    click.echo(f"report            {info['report'] or 'not built yet'}")


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
def report(config: str):
    """Rebuild histograms and report/index.html from the committed rows of CONFIG."""
    from colortrend.run import report as build_report

    click.echo(build_report(load(config)))


@main.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("outputs", nargs=-1, required=True)
def combine(config: str, outputs: tuple[str, ...]):
    """One cohort table and report from several OUTPUTS (each a colortrend output, run on its own), written to
    CONFIG's output with CONFIG's histograms and report settings."""
    from colortrend.combine import combine as combine_outputs

    click.echo(combine_outputs(load(config), outputs).line())


@main.group(context_settings=CONTEXT)
def eval() -> None:  # shadows the builtin: the command is called `eval`
    """Measure the models against labelled data."""


def eval_command(name: str, trainer: str):
    """An ``eval`` subcommand: LABELS, --config, --device, --split (the split ``train TRAINER`` holds out) and
    --json, with errors as one line; the command's own options are listed under it."""
    labels = click.argument("labels", type=click.Path(exists=True, dir_okay=False))

    def register(fn):
        for option in (json_option, split_option(trainer), device_option, eval_config_option, labels):  # reversed
            fn = option(fn)
        return eval.command(name, context_settings=CONTEXT)(fn)

    return register


@eval_command("age", trainer="age")
@click.option("--weights", multiple=True,
              help="default (the shipped four), dlib, or a weights file; repeat to average several networks "
              "[default: the config's age.weights, else default].")
@click.option("--save-predictions", type=click.Path(dir_okay=False), help="Write path,age,predicted_age per photo.")
def eval_age(labels: str, config: str | None, device: str, split: str, as_json: bool, weights: tuple[str, ...],
             save_predictions: str | None):
    """Age error of the pipeline's own detect -> align -> age path on LABELS (`path,age` CSV, or
    `path,age_lo,age_hi` for age bands as FairFace labels them).

    Scores the most confident face of each photo: MAE, median error, bias, MAE per age band, the 17-21 window's
    recall and precision, and `missed` (photos without a face); for band labels, how often the estimate falls in
    the band (overall, per band and per `race` group) and how many faces labelled 10-19 are estimated under 20.
    """
    from colortrend.evaluate.age import age_metrics, format_age_metrics, predict_ages
    from colortrend.models import pick_device

    writable("--save-predictions", save_predictions)
    cfg = load(config) if config else None
    predictions = predict_ages(labels, pick_device(device), weights or None, split, cfg=cfg)
    if save_predictions:  # the contract's columns (and the band of band labels); face quality stays in the metrics
        banded = predictions["age"].isna().any()
        columns = ["path", "age", *(["age_lo", "age_hi"] if banded else []), "predicted_age"]
        predictions[columns].to_csv(save_predictions, index=False)
    metrics = age_metrics(predictions)
    click.echo(json.dumps(metrics) if as_json else format_age_metrics(metrics))


@eval_command("parsing", trainer="parsing")
@click.option("--save-masks", type=click.Path(file_okay=False), help="Write <stem>.png garment masks (255/0) here.")
def eval_parsing(labels: str, config: str | None, device: str, split: str, as_json: bool, save_masks: str | None):
    """Garment IoU, precision and recall of the main person (largest face) on LABELS (`image,mask` CSV, CCP ids)."""
    from colortrend.evaluate.parsing import evaluate_parsing, format_parsing_metrics
    from colortrend.models import pick_device

    writable("--save-masks", save_masks, folder=True)
    metrics = evaluate_parsing(labels, pick_device(device), save_masks, split, cfg=load(config) if config else None)
    click.echo(json.dumps(metrics) if as_json else format_parsing_metrics(metrics))


@eval_command("color", trainer="parsing")
@click.option("--save-predictions", type=click.Path(dir_okay=False), help="Write per-photo colours to this CSV.")
def eval_color(labels: str, config: str | None, device: str, split: str, as_json: bool,
               save_predictions: str | None):
    """Dominant colour from the pipeline's own mask vs from the true garment pixels (CIEDE2000).

    LABELS is a CSV with `image,mask` columns (CCP ids), paths relative to it. White balance is off.
    """
    from colortrend.evaluate.color import color_metrics, format_color_metrics, predict_colors
    from colortrend.models import pick_device

    writable("--save-predictions", save_predictions)
    predictions = predict_colors(labels, pick_device(device), split=split, cfg=load(config) if config else None)
    if save_predictions:
        predictions.to_csv(save_predictions, index=False)
    metrics = color_metrics(predictions)
    click.echo(json.dumps(metrics) if as_json else format_color_metrics(metrics))


@eval.command("cohorts", context_settings=CONTEXT)
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.option("--sizes", default="2000,10000,50000", show_default=True,
              help="Persons per synthetic population, comma-separated.")
@click.option("--seeds", type=click.IntRange(1, 100), default=6, show_default=True,
              help="Splits of the labelled faces (calibration / population), each with a population per scenario "
                   "and size.")
@click.option("--correction-smoothing", "smoothing", type=click.FloatRange(0, 1e6),
              help="histograms.correction_smoothing of the corrected table (default: the setting's default, 5; "
                   "0: the plain maximum-likelihood fit).")
@json_option
def eval_cohorts(predictions: str, sizes: str, seeds: int, smoothing: float | None, as_json: bool):
    """Plant known cohort effects in synthetic populations aged with the errors in PREDICTIONS (the CSV of `eval age
    --save-predictions`) and score the cohort table, raw and corrected: top colour right, share error, interval
    coverage, per scenario (step, trend, reversal) and cohort."""
    from colortrend.evaluate.cohorts import evaluate_cohorts, format_cohort_metrics

    try:
        persons = tuple(int(x) for x in sizes.split(","))
    except ValueError:
        raise ConfigError(f"--sizes: comma-separated whole numbers, not {sizes!r}") from None
    if not persons or min(persons) < 100:
        raise ConfigError("--sizes: each population needs at least 100 persons")
    from colortrend.aggregate.histograms import HistogramSettings

    settings = HistogramSettings(min_persons=1, **({} if smoothing is None else {"correction_smoothing": smoothing}))
    metrics = evaluate_cohorts(predictions, persons, seeds, settings)
    click.echo(json.dumps(metrics, ensure_ascii=False) if as_json else format_cohort_metrics(metrics))


@main.command(context_settings=CONTEXT)
@click.argument("photo", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="Settings to analyse with (default: defaults).")
@click.option("--out", "out_png", type=click.Path(dir_okay=False), help="PNG to write (default: <photo>.explain.png).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override the config's device.")
def explain(photo: str, config: str | None, out_png: str | None, device: str | None):
    """Draw one photo's analysis: faces and ages, garment masks, palettes and colour names."""
    from colortrend.config import default_config
    from colortrend.explain import explain as draw

    cfg = load(config, device=device) if config else default_config(photo, device=device or "auto")
    writable("--out", out_png or os.path.basename(os.path.splitext(photo)[0]) + ".explain.png")
    path, people = draw(photo, cfg, out_png)
    for j, person in enumerate(people):
        rgb = "/".join(map(str, person["dominant"])) if person["dominant"] else "-"
        click.echo(f"#{j} {person['age_text']}: {person['name'] or 'no garment'} {person['name_zh'] or ''} RGB {rgb}")
    click.echo(path)


@main.group(context_settings=CONTEXT)
def train() -> None:
    """Train or fine-tune the models (needs `pip install -e .[train]`)."""


@train.command("age", context_settings=CONTEXT)
@click.argument("labels", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for age_finetuned.pt and metrics.json.")
@click.option("--arch", type=click.Choice(["aresnet10", "lite0"]), default="aresnet10", show_default=True,
              help="aresnet10: dlib's age network, fine-tuned; lite0: EfficientNet-Lite0 from ImageNet weights.")
@click.option("--epochs", type=int, default=28, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chip-size", type=click.IntRange(32, 256), default=96, show_default=True,
              help="Side of the face chips trained on, in pixels (stored with the weights).")
@click.option("--chip-scale", type=click.FloatRange(0.5, 2.0), default=1.0, show_default=True,
              help="Face scale in the chips (stored with the weights): 1.0 = the aligner's, below 1 shows more head.")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads for torch (one more process "
              "cuts the chips).")
@click.option("--init-weights", type=click.Path(exists=True, dir_okay=False),
              help="Start from this age weights file of the same architecture (default: dlib's, or ImageNet).")
@click.option("--lr", type=float, help="Peak learning rate (default: the architecture's).")
@click.option("--ema-decay", type=float, help="Decay of the weights' moving average (default: the architecture's).")
@click.option("--samples-per-epoch", type=int, help="Faces drawn per epoch (default: the training faces' number).")
@device_option
@click.option("--max-photos", type=int, help="Take at most this many photos per labels file (smoke runs).")
def train_age(labels: tuple[str, ...], out_dir: str, arch: str, epochs: int, seed: int, chip_size: int,
              chip_scale: float, threads: int, init_weights: str | None, lr: float | None, ema_decay: float | None,
              samples_per_epoch: int | None, device: str, max_photos: int | None):
    """Train an age network on one or more LABELS files (`path,age` or `path,age_lo,age_hi` CSV: exact ages or age
    bands), from dlib's or ImageNet weights, or further from a trained network (--init-weights)."""
    from colortrend.models import pick_device
    from colortrend.training.age import AgeTrainConfig, train_age as fine_tune

    writable("--out", out_dir, folder=True)
    config = AgeTrainConfig(arch=arch, epochs=epochs, seed=seed, chip_size=chip_size, chip_scale=chip_scale,
                            threads=threads, init_weights=init_weights, lr=lr, ema_decay=ema_decay,
                            samples_per_epoch=samples_per_epoch)
    metrics = fine_tune(list(labels), out_dir, config, pick_device(device), max_photos=max_photos, log=click.echo)
    click.echo(json.dumps({k: metrics[k] for k in metrics if k != "history"}, default=str))


@train.command("parsing", context_settings=CONTEXT)
@click.argument("ccp_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Weights file to write.")
@click.option("--epochs", type=int, default=26, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch.")
def train_parsing(ccp_dir: str, out_path: str, epochs: int, seed: int, threads: int):
    """Train the garment parser on a Clothing Co-Parsing folder (its images/, masks/, labels.csv)."""
    from colortrend.training.parsing import TrainSettings, train_parsing as fit

    writable("--out", out_path)
    metrics_path = str(out_path) + ".metrics.json"
    settings = TrainSettings(epochs=epochs, seed=seed, threads=threads)
    metrics = fit(ccp_dir, out_path, settings, metrics_path=metrics_path, log=click.echo)
    click.echo(json.dumps(metrics, default=str))


if __name__ == "__main__":
    main()
