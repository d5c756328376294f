"""``flexmoe run`` and ``deploy-local``: a federation in simulation or on a local deployment."""

from __future__ import annotations

import argparse
import resource
import secrets
import sys
import time
from pathlib import Path

from flexmoe.cli.options import (
    add_placement_options,
    add_setting_options,
    checked_placement,
    placement_of,
    setting_values,
)
from flexmoe.errors import FlexMoEError
from flexmoe.io import check_new_folder, check_writable, read_json
from flexmoe.results import (
    CHECKPOINT_FILE,
    DATA_FILE,
    RESULTS_FILE,
    ROUNDS_FILE,
    RoundRecord,
    RunResults,
    read_rounds,
)
from flexmoe.settings import GROUPS, Settings

SETTING_GROUPS = (Settings, *GROUPS.values())  # every setting's options, top-level ones first


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run a federation in simulation (default: FLEx on the packaged Dolly-15k)",
        description="Run a federated job on Flower's simulation engine, evaluate every client, "
        "print a results table and write OUT/results.json with OUT/rounds.json beside it.",
    )
    add_run_options(run)
    run.add_argument("--resume", type=Path, metavar="OUT", help="continue the run saved in OUT")
    run.add_argument(
        "--regraft",
        type=client_list,
        default=(),
        metavar="CLIENTS",
        help="with --resume: clients (e.g. 1,3) whose lost personal state is grafted afresh "
        "(recorded in the results); without it a resume with lost state is refused",
    )
    run.set_defaults(command=run_run, loads_models=True)

    deploy = commands.add_parser(
        "deploy-local",
        help="run the same app on a real Flower deployment on this machine (TLS, loopback)",
        description="Start a Flower SuperLink and N SuperNodes on 127.0.0.1 over TLS with "
        "generated certificates, run the flexmoe app on them, stop everything, and write "
        "OUT/results.json.",
    )
    deploy.add_argument("--supernodes", type=int, required=True, metavar="N")
    add_run_options(deploy)
    deploy.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    deploy.add_argument(
        "--no-node-worker",
        dest="node_workers",
        action="store_false",
        help="let every message's ClientApp process load the model itself (Flower's way) "
        "instead of a node worker per SuperNode that keeps it loaded",
    )
    deploy.add_argument(
        "--share-diagnostics",
        action="store_true",
        help="let the SuperNodes report category names, knowledge, routing and graft losses "
        "(a deployment's nodes keep them by default)",
    )
    deploy.set_defaults(command=run_deploy_local, loads_models=True)

    worker = commands.add_parser(
        "node-worker",
        help="serve a SuperNode's jobs from a process that keeps the model loaded",
        description="Listen on a Unix socket for the jobs of this node's ClientApp processes "
        "(name it in the SuperNode's --node-config as worker-socket=PATH) and run them, "
        "keeping the client's data and base model loaded between messages. Stops on SIGTERM.",
    )
    worker.add_argument("--socket", type=Path, required=True, help="node-local socket path")
    worker.set_defaults(command=run_node_worker, loads_models=True)

    export = commands.add_parser(
        "export",
        help="write a trained client's model: a flexmoe adapter and a plain PEFT LoRA adapter",
        description="Assemble client I's model after the run's last round (or --round N): the "
        "global shared parameters with the client's personal state. Writes a folder that "
        "FlexModel.from_pretrained, flexmoe info --adapter and flexmoe eval load, and, where "
        "the shared parameters are LoRA, adapter_config.json + adapter_model.safetensors, which "
        "peft.PeftModel.from_pretrained (and vLLM's LoRA serving) loads onto the base model.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a flexmoe run's folder")
    export.add_argument("--client", type=int, required=True, metavar="I")
    export.add_argument("--out", type=Path, required=True, help="folder for the export")
    export.add_argument("--round", type=int, metavar="N", help="default: the run's last round")
    export.add_argument(
        "--state-dir",
        type=Path,
        help="the node folder holding the client's state, where it is not the run's own "
        "(a SuperNode's state-dir on another host)",
    )
    export.add_argument(
        "--merge",
        action="store_true",
        help="also write OUT/merged, a checkpoint plain transformers loads: LoRA merged, the "
        "personal expert as a Qwen2-MoE gated shared expert (refused where not exact)",
    )
    export.add_argument(
        "--force", action="store_true", help="write into --out even if it holds files already"
    )
    add_placement_options(export)
    export.set_defaults(command=run_export, loads_models=True)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every run setting as an option (each also settable in --config FILE.toml).

    Values stay text here: ``Settings`` parses and checks them, so that a bad value is one
    ``flexmoe: error:`` line naming the setting.
    """
    parser.add_argument("--config", type=Path, help="TOML file of settings")
    parser.add_argument("--out", type=Path, help="output folder (default runs/<time>-<method>)")
    for group in SETTING_GROUPS:
        add_setting_options(parser, group, unset=True)


def given_settings(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as options, by their field names."""
    given = (setting_values(args, group).items() for group in SETTING_GROUPS)
    return {name: value for values in given for name, value in values if value is not None}


def new_settings(args: argparse.Namespace) -> Settings:
    """A new run's settings: --config's (or the defaults), then the options given."""
    base = Settings.from_toml(args.config) if args.config else Settings()
    return base.updated(given_settings(args))


def client_list(text: str) -> tuple[int, ...]:
    """``1,3`` as client ids."""
    try:
        clients = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of client ids like 1,3") from None
    if not clients or min(clients) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of client ids like 1,3")
    return clients


def default_out(settings: Settings, kind: str = "") -> Path:
    """``runs/<time>-<kind><method>-<random>``: two runs started in one second differ."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{kind}{settings.method}-{secrets.token_hex(2)}"


def run_run(args: argparse.Namespace) -> None:
    """Run (or resume) a federation in simulation and print its results."""
    if args.resume is not None:
        if args.config or args.out:
            raise FlexMoEError("--resume continues a run with its own settings and folder; "
                               "give neither --config nor --out with it")  # fmt: skip
        out, settings, given = args.resume, None, given_settings(args)
    else:
        settings, given = new_settings(args), None
        out = args.out or default_out(settings)
    check_writable(out)
    from flexmoe.federated.run import Resume, claimed, resolve_run  # after the settings: heavy
    from flexmoe.federated.simulation import simulate

    resume = Resume.REQUIRED if settings is None else Resume.NEVER
    with claimed(out):
        run = resolve_run(out, settings, given, resume, args.regraft)
        settings = run.settings
        checked_placement(settings.device, settings.dtype)  # a device this machine lacks
        federation = settings.federation
        print(f"flexmoe run: {settings.method}, {federation.clients} clients, "
              f"{federation.rounds} rounds -> {out}")  # fmt: skip
        results = simulate(run)
    print(results_table(results))
    report = read_json(out / DATA_FILE, "rerun to write it")
    print(truncation_table(report, settings.data.max_length))
    print(round_times(read_rounds(out / ROUNDS_FILE)))
    print(f"peak memory of the server process: {peak_memory_gb():.2f} GB resident")
    print(f"results written to {out / RESULTS_FILE}")


def run_deploy_local(args: argparse.Namespace) -> None:
    """Run the app on a local TLS deployment of Flower and print its results."""
    settings = new_settings(args)
    if args.clients is not None and args.clients != args.supernodes:
        raise FlexMoEError(
            f"--clients {args.clients} and --supernodes {args.supernodes} disagree: every "
            "SuperNode is one client; give --supernodes alone"
        )
    settings = settings.updated({"clients": args.supernodes})
    from flexmoe.federated.client_app import check_limits
    from flexmoe.federated.deploy import deploy_local, find_app_dir
    from flexmoe.federated.protocol import DEPLOYED
    from flexmoe.federated.run import resolve_run
    from flexmoe.federated.simulation import check_run
    from flexmoe.results import read_results

    out = (args.out or default_out(settings, "deploy-")).resolve()
    check_writable(out)
    if (out / CHECKPOINT_FILE).is_file():  # its clients' state is on its SuperNodes' disks
        raise FlexMoEError(
            f"{out} holds a run, and deploy-local starts a new one each time (it cannot resume "
            "one); give another --out"
        )
    check_limits(settings, DEPLOYED)  # what the SuperNodes would refuse, before any starts
    checked_placement(settings.device, settings.dtype)
    resolve_run(out, settings)  # its folder's checks, here before any process starts
    check_run(settings)
    print(f"flexmoe deploy-local: {args.supernodes} SuperNodes over TLS -> {out}")
    deploy_local(
        find_app_dir(),
        args.supernodes,
        out,
        settings.to_run_config(),
        args.timeout,
        args.node_workers,
        args.share_diagnostics,
    )
    print(results_table(read_results(out / RESULTS_FILE)))
    print(round_times(read_rounds(out / ROUNDS_FILE)))
    print(f"results written to {out / RESULTS_FILE}; logs in {out / 'logs'}")


def run_node_worker(args: argparse.Namespace) -> None:
    """Serve this node's jobs until stopped."""
    from flexmoe.federated.client_app import run_job
    from flexmoe.federated.node_worker import serve

    serve(args.socket, run_job)


def round_times(rounds: list[RoundRecord]) -> str:
    """Where a round's time went: the clients' work, and Flower's part (with waiting)."""
    later = rounds[1:] or rounds  # the first round also starts the clients
    wall, clients = sum(r.wall_s for r in later), sum(r.client_seconds for r in later)
    startup = sum(r.startup_seconds for r in later)
    which = "rounds 2+" if len(rounds) > 1 else "round 1"
    text = (
        f"{which}: {wall / len(later):.1f} s per round, of which the longest client worked "
        f"{clients / len(later):.1f} s (load, restore, compute, save)"
    )
    if startup:
        text += f", its message's process took {startup / len(later):.1f} s to start"
    return f"{text}; Flower and waiting {max(0.0, wall - clients - startup) / len(later):.1f} s"


def peak_memory_gb() -> float:
    """The most memory this process has held resident (macOS counts bytes, Linux kilobytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def truncation_table(report: dict[str, dict[str, int]], max_length: int) -> str:
    """Per category, how many of the examples used were cut short to fit ``max_length``."""
    lines = [f"examples cut to fit max-length {max_length}: input [...] / answer too / used"]
    lines += [
        f"  {category:<28} {c['context_cut']:>6} {c['answer_cut']:>6} {c['examples']:>6}"
        for category, c in report.items()
    ]
    return "\n".join(lines)


def results_table(results: RunResults) -> str:
    """A per-client table of one run's results, with totals."""
    header = f"{'client':>6}  {'categories':<40} {'train':>6} {'test':>5} {'ROUGE-L':>8}"
    lines = [
        f"method {results.method}, split {results.split}, seed {results.seed}, "
        f"{results.rounds} rounds",
        header,
        "-" * len(header),
    ]
    for client in results.clients:
        categories = ", ".join(client.categories)[:40]
        lines.append(
            f"{client.client_id:>6}  {categories:<40} {client.n_train:>6} "
            f"{client.n_test:>5} {client.rouge_l:>8.2f}"
        )
    comm = results.comm
    lines += [
        "-" * len(header),
        f"mean ROUGE-L {results.mean_rouge_l:.2f}   uplink {comm.bytes_up / 1e6:.2f} MB   "
        f"downlink {comm.bytes_down / 1e6:.2f} MB   wall {results.wall_s or 0:.0f} s",
    ]
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> None:
    """Write a client's model out of a run."""
    from flexmoe.export import export_client

    check_writable(args.out)
    if not args.force:
        check_new_folder(args.out)
    done = export_client(
        args.run_dir,
        args.client,
        args.out,
        args.round,
        args.state_dir,
        placement_of(args),
        args.merge,
    )
    peft = " and a PEFT LoRA adapter" if done.peft else ""
    peft += f", and a merged checkpoint in {args.out / 'merged'}" if args.merge else ""
    print(
        f"client {done.client}'s {done.method} model after round {done.round} of run "
        f"{done.run_id} (personal state of round {done.personal_round}) written to {args.out}"
        f": a flexmoe adapter{peft}"
    )
