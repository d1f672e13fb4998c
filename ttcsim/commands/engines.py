"""``ttcsim engines list|show``: the shipped engine profiles."""

from __future__ import annotations

import functools
import json

import click


def _friendly(fn):
    """Defer to :func:`ttcsim.cli._friendly` (imported late: cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ttcsim.cli import _friendly as friendly

        return friendly(fn)(*args, **kwargs)

    return wrapper


@click.group("engines")
def engines() -> None:
    """Engine profiles (how an inference engine runs on the GPU)."""


@engines.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_friendly
def engines_list(as_json: bool) -> None:
    """List the shipped engine profiles."""
    from ttcsim.engines import get_engine, list_engines

    rows = []
    for name in list_engines():
        e = get_engine(name)
        rows.append({
            "name": e.name, "aliases": e.aliases, "version": e.version, "status": e.status,
            "batching": e.batching.policy, "max_num_seqs": e.batching.max_num_seqs,
            "kv_allocation": e.kv_cache.allocation, "cuda_graphs": e.kernels.cuda_graphs,
            "display_name": e.display_name,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<16} {'aliases':<16} {'batching':<15} {'KV':<7} {'graphs':<7} status")
    for r in rows:
        batching = r["batching"] + (f"({r['max_num_seqs']})" if r["max_num_seqs"] else "")
        graphs = "yes" if r["cuda_graphs"] else "no"
        click.echo(f"{r['name']:<16} {','.join(r['aliases']):<16} {batching:<15} "
                   f"{r['kv_allocation']:<7} {graphs:<7} {r['status']}")


@engines.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@_friendly
def engines_show(name: str, as_json: bool) -> None:
    """Print one engine profile (name, alias or YAML path)."""
    from ttcsim.engines import engine_to_yaml, get_engine

    e = get_engine(name, where="NAME")
    if as_json:
        click.echo(json.dumps(e.model_dump(mode="json"), indent=2))
    else:
        click.echo(engine_to_yaml(e))


COMMANDS = [engines]
