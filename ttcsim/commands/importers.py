"""``ttcsim import``: public measurement sets as run records.

Thin command: parse options, call :func:`ttcsim.importers.mlenergy.import_tree`,
write JSON lines, report.  Only click is imported at module level.
"""

from __future__ import annotations

import functools

import click


def _friendly(fn):
    """Defer to :func:`ttcsim.cli._friendly` (imported late: cli imports this module)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ttcsim.cli import _friendly as friendly

        return friendly(fn)(*args, **kwargs)

    return wrapper


@click.group("import")
def import_group() -> None:
    """Turn public measurements into run records (for validate and calibrate fit)."""


@import_group.command("mlenergy")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Run records to write (JSON lines).")
@click.option("--chars-per-token-chat", default=None, type=float,
              help="Characters per token of the chat prompts [default: 4.0].")
@click.option("--chars-per-token-code", default=None, type=float,
              help="Characters per token of the code prompts [default: 2.5].")
@click.option("--prompt-lengths", "prompt_lengths", default=None,
              type=click.Path(dir_okay=False),
              help="prompt_lengths.json with the prompts' lengths in characters "
                   "[default: the copy shipped with ttcsim].")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@_friendly
def import_mlenergy(path, out_path, chars_per_token_chat, chars_per_token_code,
                    prompt_lengths, force) -> None:
    """Read an ML.ENERGY Leaderboard v2 result tree (or checkout) into run records.

    PATH is the llm_text_generation folder, its parent, or a checkout root.
    One record per result file; results ttcsim cannot represent are skipped
    and listed.
    """
    import json

    from ttcsim.importers.mlenergy import import_tree
    from ttcsim.io import atomic_write_text

    ratios = {k: v for k, v in (("chat", chars_per_token_chat), ("code", chars_per_token_code))
              if v is not None}
    for task, ratio in ratios.items():
        if not ratio > 0:
            raise click.BadParameter(f"must be > 0, got {ratio}",
                                     param_hint=f"--chars-per-token-{task}")
    result = import_tree(path, ratios, prompt_lengths)
    if not result.records:
        from ttcsim.errors import TtcsimError

        raise TtcsimError(f"no representable results ({len(result.skipped)} skipped)", path)
    text = "".join(json.dumps(r) + "\n" for r in result.records)
    written = atomic_write_text(out_path, text, overwrite=force)
    click.echo(f"wrote {len(result.records)} run records from {result.root} to {written}")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)}:")
        for rid, reason in result.skipped:
            click.echo(f"  {rid}: {reason}")


COMMANDS = [import_group]
