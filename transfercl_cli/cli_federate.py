"""`tcl federate certs|server|client`: federated fine-tuning on Flower (transfercl_cli/federate.py does the work).

Registered in cli.py with `main.add_command(federate)`; nothing here imports Flower until a command runs, so `tcl
--help` works without the `federated` extra.
"""
import json
import os

import click

DEVICE_HELP = "OpenCL device (as `tcl finetune --device`)."


def _echo(quiet):
    return (lambda *a: None) if quiet else (lambda m: click.echo(m))


def _verbose():
    from .cli import _State

    return _State.verbose


@click.group("federate")
def federate():
    """Fine-tune one model across many devices with Flower; the images never leave any of them.

    One machine runs `tcl federate server RECIPE`, every device `tcl federate client RECIPE --server HOST:PORT`
    with the same recipe; each round the devices fine-tune from the global model on their own images and send back
    only the trainable layers. Needs the `federated` extra (pip install '.[federated]')."""


@federate.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="A name or address clients use to reach the server (repeatable); localhost, 127.0.0.1 and ::1 "
                   "are always included.")
@click.option("--days", type=click.IntRange(1, 3650), default=825, show_default=True, help="Validity.")
@click.option("--force", is_flag=True, help="Replace the files already in OUT_DIR.")
@click.option("--json", "as_json", is_flag=True)
def certs(out_dir, hosts, days, force, as_json):
    """Write a CA, a server certificate and a federation token into OUT_DIR.

    The server uses ca.crt, server.crt, server.key and federation.token (--certs OUT_DIR); each device needs ca.crt
    and federation.token in a folder of its own (--certs). Keep ca.key private: it is only needed to make new
    certificates."""
    from .federate import make_certs

    out = make_certs(out_dir, hosts=hosts, days=days, force=force)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"wrote {out_dir}: ca.crt, ca.key, server.crt, server.key, federation.token "
               f"(server certificate for {', '.join(out['hosts'])}; valid until {out['expires']})")
    click.echo("server:  tcl federate server RECIPE --certs " + out_dir)
    click.echo("devices: copy ca.crt and federation.token into a folder on each device, then "
               "tcl federate client RECIPE --server HOST:PORT --certs FOLDER")
    click.echo("keep ca.key private (it signs certificates; neither the server nor the devices need it)")


@federate.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--address", default="0.0.0.0:8080", show_default=True, metavar="HOST:PORT",
              help="Where to listen (0.0.0.0: every network interface).")
@click.option("--certs", "certs_dir", type=click.Path(file_okay=False),
              help="Folder with ca.crt, server.crt, server.key (and federation.token) from `tcl federate certs`.")
@click.option("--insecure", is_flag=True, help="No TLS (not encrypted; only on a network you trust).")
@click.option("--data", "data_root", type=str, help="Held-out images to measure the global model on (override "
                                                     "federated.server_data).")
@click.option("--rounds", type=click.IntRange(1), help="Override federated.rounds.")
@click.option("--local-epochs", type=click.IntRange(1), help="Override federated.local_epochs.")
@click.option("--min-clients", type=click.IntRange(1), help="Override federated.min_clients.")
@click.option("--strategy", type=click.Choice(["fedavg", "fedprox", "fedadam"]), help="Override federated.strategy.")
@click.option("--device", type=str, help=DEVICE_HELP + " (for measuring on the server's data)")
@click.option("--output", "-o", type=str, help="Override output (the global run directory).")
@click.option("--resume", is_flag=True, help="Continue the federated run in the output directory after its last "
                                             "finished round.")
@click.option("--force", is_flag=True, help="Replace a run already in the output directory.")
@click.option("--dry-run", is_flag=True, help="Print the plan, what travels each round and the recipe digest; stop.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final line (for cron and scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def server(recipe, address, certs_dir, insecure, data_root, rounds, local_epochs, min_clients, strategy, device,
           output, resume, force, dry_run, quiet, as_json):
    """Serve a federation: hold the global model, run the rounds, write the global run directory."""
    from .cli import _sigterm_as_ctrl_c
    from .federate import run_server
    from .recipe import load_recipe

    overrides = {"federated.server_data": os.path.abspath(data_root) if data_root else None,
                 "federated.rounds": rounds, "federated.local_epochs": local_epochs,
                 "federated.min_clients": min_clients, "federated.strategy": strategy, "device": device,
                 "output": os.path.abspath(output) if output else None}
    r = load_recipe(recipe, overrides)
    with _sigterm_as_ctrl_c():
        res = run_server(r, address=address, certs=certs_dir, insecure=insecure, resume=resume, force=force,
                         log=_echo(quiet or as_json), quiet=True, dry_run=dry_run, verbose=_verbose())
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
    elif quiet and not dry_run:
        last = res["rounds"][-1] if res["rounds"] else {}
        acc = last.get("val_accuracy")
        click.echo(f"{res['run_dir']}: {len(res['rounds'])} rounds"
                   + (f", global accuracy {acc:.4f}" if acc is not None else ""))


@federate.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--server", "server_address", required=True, metavar="HOST:PORT", help="The server's address.")
@click.option("--certs", "certs_dir", type=click.Path(file_okay=False),
              help="Folder with the federation's ca.crt (and federation.token).")
@click.option("--insecure", is_flag=True, help="No TLS, for a server started with --insecure.")
@click.option("--data", "data_root", type=str, help="Override data.root (this device's images).")
@click.option("--device", type=str, help=DEVICE_HELP)
@click.option("--name", type=str, help="This device's name in the server's reports (default: the host name).")
@click.option("--max-wait", type=click.FloatRange(0), default=120.0, show_default=True, metavar="SECONDS",
              help="How long to keep trying to reach the server (at the start, and after losing it).")
@click.option("--dry-run", is_flag=True, help="Print the plan, what travels each round and the recipe digest; stop.")
@click.option("--quiet", "-q", is_flag=True, help="Only the final line (for cron and scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def client(recipe, server_address, certs_dir, insecure, data_root, device, name, max_wait, dry_run, quiet, as_json):
    """Take part in a federation: fine-tune on this device's images each round, send back the trained layers."""
    from .cli import _sigterm_as_ctrl_c
    from .federate import run_client
    from .recipe import load_recipe

    overrides = {"data.root": os.path.abspath(data_root) if data_root else None, "device": device}
    r = load_recipe(recipe, overrides)
    with _sigterm_as_ctrl_c():
        res = run_client(r, server_address, certs=certs_dir, insecure=insecure, name=name, max_wait=max_wait,
                         log=_echo(quiet or as_json), quiet=True, dry_run=dry_run, verbose=_verbose())
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
    elif quiet and not dry_run:
        click.echo(f"{res['client']}: trained in {len(res['rounds'])} round(s)")
