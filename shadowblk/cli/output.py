"""How commands report: human text by default, one JSON document with --json."""

import json
import sys
from collections.abc import Callable
from typing import Any

import click

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
)


def emit(data: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print DATA as JSON when asked, else as the text HUMAN renders from it."""
    if as_json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        click.echo(human(data))
