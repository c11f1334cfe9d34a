"""The OpenAPI document the manager serves, and request validation against its schemas.

The document (openapi.yaml beside this module) is the one description of the API: the same
schemas validate every request body and path parameter, so what the document promises and
what the server refuses cannot drift apart.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shadowblk.manager.api_errors import ApiError

_URI = "urn:shadowblk:manager-api"


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document, parsed once."""
    text = resources.files("shadowblk.manager").joinpath("openapi.yaml").read_text()
    return yaml.safe_load(text)


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    resource = Resource(contents=document(), specification=DRAFT202012)
    registry = Registry().with_resource(_URI, resource)
    return Draft202012Validator(
        {"$ref": f"{_URI}#/components/schemas/{schema_name}"}, registry=registry
    )


def check(schema_name: str, value: Any, what: str = "body") -> None:
    """Raise a 422 naming the first field of VALUE that breaks the document's SCHEMA_NAME."""
    error = best_match(_validator(schema_name).iter_errors(value))
    if error is None:
        return
    where = ".".join(str(p) for p in error.absolute_path)
    field = f"{what}.{where}" if where else what
    raise ApiError(422, f"{field}: {error.message}", {"field": field})
