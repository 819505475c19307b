"""The vpatch command group and what every verb shares: the stderr console, progress, the
one-line user errors."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from .._version import __version__
from ..errors import VpatchError
from ..merge.engine import Report
from ..output import Terminated

# markup is off everywhere: concept names, keys and paths are user data, and "[/x]" in one of them
# must print as itself, not crash rich after the output was written
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _stderr_is_tty() -> bool:
    try:
        return err.file.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class RichReporter:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._p: Progress | None = None
        self._task = None

    def _columns(self) -> tuple:
        return (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())

    def start(self, description: str, total: int) -> None:
        # off a terminal rich draws nothing live and a transient bar leaves one blank line at stop,
        # which would push a user error off stderr's first line; FORCE_COLOR (common in CI) makes
        # rich call a pipe a terminal, so the stream itself is asked
        if self.quiet or not _stderr_is_tty():
            return
        self._p = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            *self._columns(),
            console=err,
            transient=True,
        )
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


class CountReporter(RichReporter):
    """Progress in items (prompts), not bytes."""

    def _columns(self) -> tuple:
        return (MofNCompleteColumn(), TimeElapsedColumn())


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except VpatchError as e:
            msg = " ".join(str(e).split())
            click.echo(f"vpatch: {type(e).__name__}: {msg}", err=True)
            plan = getattr(e, "plan", None)
            if plan is not None:  # the details, after the message (a script reads the first line)
                _coverage_table(plan.coverage())
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("vpatch: interrupted; no output was written", err=True)
            sys.exit(130)
        except Terminated as e:  # SIGTERM / SIGHUP during a write: temporaries already removed
            click.echo(f"vpatch: stopped by signal {e.signum}; no output was written", err=True)
            sys.exit(128 + e.signum)

    return wrapper


def warn(message: str) -> None:
    """A warning on stderr; the message is user data (paths, keys), never rich markup."""
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _coverage_table(cov: dict) -> None:
    err.print(f"coverage: {cov['matched']}/{cov['expected']} entries matched ({cov['how']})")
    for k in cov["missing"][:20]:
        err.print(f"  missing  {k}")
    for k in cov["shape_mismatch"][:20]:
        err.print(f"  shape    {k}")
    if cov["other_component"]:
        err.print(
            f"  {len(cov['other_component'])} entries belong to other components and were not considered"
        )


def _show_report(r: Report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        _coverage_table(r.coverage)
        if r.tensors:
            t = Table(
                title=f"{r.action}: {r.concept} (delta {r.delta_sha256[:12]})", show_lines=False
            )
            t.add_column("tensor", overflow="fold")
            for c in ("dtype", "fingerprint", "edit kept", "changed"):
                t.add_column(c)
            for s in r.tensors:
                fp = (
                    {True: "base", False: "differs", None: "-"}[s.base_match]
                    if r.action == "apply"
                    else {True: "exact", False: "inexact", None: "-"}[s.exact]
                )
                t.add_row(
                    s.key,
                    s.dtype,
                    fp,
                    f"{max(0.0, 1 - s.rounding_error):.1%}",
                    f"{s.changed_fraction:.1%}",
                )
            err.print(t)
        elif r.planned:
            t = Table(title=f"plan: {r.concept} (delta {r.delta_sha256[:12]})")
            t.add_column("tensor", overflow="fold")
            for c in ("kind", "rank", "dtype", "fingerprint"):
                t.add_column(c)
            for p in r.planned:
                t.add_row(p["key"], p["kind"], str(p["rank"]), p["dtype"], p["fingerprint"])
            err.print(t)
            err.print(
                f"bytes to write: {_mib(r.bytes_total)} ({_mib(r.bytes_edited)} edited, the rest copied byte for byte); "
                f"estimated peak memory: {_mib(r.peak_estimate)}"
            )
        if r.output:
            click.echo(r.output)
    for w in r.warnings:
        warn(w)


_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # absent before click 8.2


def _sub_path(ctx: click.Context | None) -> list[str]:
    """The subcommand names below the root (the root's own name is `python -m patcher.cli` or a
    test runner's, not what a user types)."""
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return [n for n in reversed(names) if n]


class _OneLineGroup(click.Group):
    """Usage errors (a missing argument, an unknown option, a bad value) as the other user errors
    are: one line on stderr, exit 2, with the command to ask for help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS as e:  # a bare `vpatch` (click >= 8.2): the help, as asked
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            where = " ".join(["vpatch", *_sub_path(e.ctx)])
            msg = " ".join(e.format_message().split())
            click.echo(f"vpatch: UsageError: {msg} (see {where} --help)", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("vpatch: aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"vpatch: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=_OneLineGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="vpatch")
def main() -> None:
    """Remove a concept from a text-to-video model by a low-rank edit baked into its weights.

    \b
    Typical use:
      vpatch probe MODEL -c nudity -o concept.vud  find the concept's direction (needs [probe])
      vpatch build ACTS -o other.vud --strength 1.5  another delta from saved activations
      vpatch inspect concept.vud                  what a delta edits
      vpatch apply MODEL concept.vud              merge it (streaming, weights only) next to MODEL
      vpatch inspect MODEL-no-nudity              which deltas a checkpoint carries
      vpatch merge a.vud b.vud -o ab.vud          several concepts in one delta
      vpatch export concept.vud --base MODEL -o erase.safetensors   the same edit as a LoRA

    MODEL is a .safetensors file, a sharded *.safetensors.index.json, a component folder or a
    diffusers pipeline folder. Exit code 2 means bad input; the message says how to fix it.
    """
