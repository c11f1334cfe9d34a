"""`shadowblk predict`: train, evaluate and apply the SMART failure model; regenerate its docs."""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shadowblk.cli.output import emit, json_option

DATA_HELP = "SMART history: a start-stop CSV or Backblaze daily CSVs (.csv or .csv.gz)."
data_option = click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=DATA_HELP + " Repeat for several files.",
)
model_option = click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A model file written by `predict train`.",
)
seed_option = click.option("--seed", default=0, show_default=True, help="Seed of every draw.")


def clear_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad data or a bad model file end the command with one clear line, not a traceback.

    DataFormatError and ModelFileError are ValueErrors; the predictor modules are imported
    inside the commands so that `shadowblk` starts fast for every other command.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group("predict")
def command() -> None:
    """Predict drive failure within 30 days from SMART history (see docs/prediction.md)."""


@command.command("train")
@data_option
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Model file."
)
@seed_option
@click.option(
    "--holdout",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, 0.9),
    help="Share of drives (by serial hash) kept out of training for `evaluate`.",
)
@json_option
@clear_errors
def train_command(
    data: tuple[Path, ...], out: Path, seed: int, holdout: float, as_json: bool
) -> None:
    """Train a model; the same data and seed give the same model file."""
    from shadowblk.predict.loaders import load_drives
    from shadowblk.predict.training import train

    table = load_drives(data)
    model = train(table, seed=seed, holdout=holdout, sources=[p.name for p in data])
    model.save(out)
    report = {"model": str(out), "bytes": out.stat().st_size} | model.info
    emit(report, as_json, _train_text)


def _train_text(r: dict[str, Any]) -> str:
    d, f = r["drives"], r["failed_drives"]
    return (
        f"wrote {r['model']} ({r['bytes']} bytes, {r['trees']} trees)\n"
        f"trained on {d['fit']} drives ({f['fit']} failed), calibrated on {d['calibration']} "
        f"({f['calibration']} failed), {d['held_out']} held out for evaluation"
    )


@command.command("evaluate")
@model_option
@data_option
@seed_option
@click.option(
    "--all-drives", is_flag=True, help="Judge on every drive, not only those held out in training."
)
@json_option
@clear_errors
def evaluate_command(
    model_path: Path, data: tuple[Path, ...], seed: int, all_drives: bool, as_json: bool
) -> None:
    """AUC, recall at 0.1% and 1% FPR and the rule baseline per lead time; Brier, reliability."""
    from shadowblk.predict.evaluation import evaluate, unseen_drives
    from shadowblk.predict.loaders import load_drives
    from shadowblk.predict.model import Model

    model = Model.load(model_path)
    table = load_drives(data)
    if not all_drives:
        table = table.subset(unseen_drives(model, table))
    emit(evaluate(model, table, seed=seed), as_json, _evaluate_text)


def _evaluate_text(r: dict[str, Any]) -> str:
    lines = [f"{r['drives']} drives judged, {r['failed_drives']} failed"]
    head = "  ".join(f"R@{f}" for f in r["leads"][0]["at_fpr"])
    lines.append(
        f"{'L':>3}  {'pos':>5} {'neg':>6}  AUC    {head}  rule R@FPR       model R@rule-FPR"
    )
    for x in r["leads"]:
        at = "  ".join(f"{v:.3f}" for v in x["at_fpr"].values())
        lines.append(
            f"{x['lead_days']:>3}  {x['positives']:>5} {x['negatives']:>6}  {x['auc']:.3f}  "
            f"{at}    {x['rule']['recall']:.3f}@{x['rule']['fpr']:.3f}      "
            f"{x['recall_at_rule_fpr']:.3f}"
        )
    c = r["calibration"]
    lines.append(
        f"Brier {c['brier']:.5f} (base rate {c['brier_base_rate']:.5f}) on {c['samples']} "
        "drive-times"
    )
    for b in c["reliability"]:
        if b["count"]:
            lines.append(
                f"  p in {b['bin'][0]:g}-{b['bin'][1]:g}: {b['count']:>7} predicted "
                f"{b['mean_predicted']:.4f} observed {b['observed']:.4f}"
            )
    return "\n".join(lines)


@command.command("score")
@model_option
@data_option
@click.option("--top", type=click.IntRange(min=1), help="Only the N riskiest drives.")
@json_option
@clear_errors
def score_command(model_path: Path, data: tuple[Path, ...], top: int | None, as_json: bool) -> None:
    """P(fail within 30 days) per drive at its latest record, with the features behind it."""
    from shadowblk.predict.loaders import load_drives
    from shadowblk.predict.model import Model
    from shadowblk.predict.scoring import score_latest

    model = Model.load(model_path)
    scores = score_latest(model, load_drives(data))
    emit(scores[:top] if top else scores, as_json, _score_text)


def _score_text(scores: list[dict[str, Any]]) -> str:
    lines = []
    for s in scores:
        why = ", ".join(
            f"{d['feature']}={d['value']:g}" if d["value"] is not None else d["feature"]
            for d in s["drivers"]
        )
        lines.append(
            f"{s['probability']:.4f}  {s['serial']:<20} {s['model']:<24} {s['date']}  {why}"
        )
    return "\n".join(lines)


@command.command("report")
@data_option
@click.option(
    "--out",
    default=Path("docs/prediction.md"),
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the document.",
)
@seed_option
@clear_errors
def report_command(data: tuple[Path, ...], out: Path, seed: int) -> None:
    """Run both evaluation splits on DATA and write docs/prediction.md with the figures."""
    from shadowblk.predict import report
    from shadowblk.predict.loaders import load_drives

    table = load_drives(data)
    result = report.run(table, seed=seed, sources=[p.name for p in data])
    argv = ["shadowblk", "predict", *sys.argv[sys.argv.index("report") :]]
    out.write_text(report.render(result, shlex.join(argv)))
    click.echo(f"wrote {out}")
