"""The FHIR schema the compiler checks paths and types against: the fhir.resources R4B models
(FHIR 4.3, R4's compatible update; every element of every type, installed, never downloaded).

A *model* here is the fhir.resources class of a resource or complex type (Patient, HumanName,
ObservationComponent), or the FHIR name of a primitive type ("date", "boolean"), which has no
elements of its own.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from typing import Any

PRIMITIVE_CHILDREN = ("id", "extension")
"""What FHIRPath may read below a primitive value."""


def element(model: Any, name: str) -> tuple[bool, Any] | None:
    """(repeats, model) of the element `name` of `model`; None when `model` is unknown or has
    no such element (a choice such as `value` is not one element: see `choice_types`)."""
    if model is None or isinstance(model, str):
        return None
    info = _fields(model).get(name)
    if info is None:
        return None
    annotation, repeats, primitive = info.annotation, False, None
    for _ in range(5):  # unwrap Optional[List[Optional[Annotated[str, Code()]]]]
        origin = typing.get_origin(annotation)
        if origin is list:
            repeats = True
        if origin is typing.Annotated:
            primitive = _primitive_name(typing.get_args(annotation)[-1])
        if origin in (list, typing.Union, types.UnionType, typing.Annotated):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return repeats, "boolean"
    klass = getattr(annotation, "get_model_klass", None)
    return repeats, klass() if klass else primitive


def choice_types(model: Any, name: str) -> dict[str, str]:
    """The types a choice element may take and the element each is, e.g. for Observation.value
    {"Quantity": "valueQuantity", "string": "valueString", ...}; empty when `name` is no choice."""
    if model is None or isinstance(model, str):
        return {}
    found = {}
    for alias, info in _fields(model).items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("one_of_many") == name and (typed := element(model, alias)):
            found[type_name(typed[1]) or alias[len(name) :]] = alias
    return found


def choice_element(name: str, type_: str) -> str:
    """The element of the choice `name` of type `type_`: value, Quantity is valueQuantity."""
    return name + type_[:1].upper() + type_[1:]


def type_name(model: Any) -> str | None:
    """The FHIR type name of `model`: "date", "HumanName", "ObservationComponent"."""
    if model is None or isinstance(model, str):
        return model
    return str(model.get_resource_type())


def unknown_element(model: Any, name: str) -> str | None:
    """Why `name` is not an element of `model` (naming the closest one), or None when it is one
    or `model` is unknown."""
    if model is None:
        return None
    if isinstance(model, str):
        if name in PRIMITIVE_CHILDREN:
            return None
        return f"{name!r} is read from a {model}, which has no elements"
    if element(model, name) or choice_types(model, name) or (name == "resourceType" and _is_resource(model)):
        return None
    names = [alias for alias in _fields(model) if not alias.startswith("_") and alias != "fhir_comments"]
    names += [extra["one_of_many"] for extra in _choices(model)]
    return f"{type_name(model)} has no element {name!r}{_did_you_mean(name, names)}"


def unknown_type(model: Any, name: str, type_: str) -> str | None:
    """Why `name.ofType(type_)` names no type of the choice `name` (None when it does, or when
    `name` is not a choice of a known model)."""
    choices = choice_types(model, name)
    if not choices or choice_element(name, type_) in choices.values():
        return None
    return f"{type_name(model)}.{name} has no type {type_!r}{_did_you_mean(type_, list(choices))}"


@functools.cache
def resource_model(resource_type: str) -> Any:
    """The model of a resource type, None for anything else."""
    model = complex_model(resource_type)
    return model if model is not None and _is_resource(model) else None


@functools.cache
def complex_model(type_: str) -> Any:
    """The model of a complex type or resource (Extension, Quantity, Patient), None if unknown."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(type_)
    except (KeyError, ValueError, ImportError):
        return None


def unknown_resource(resource_type: str) -> str | None:
    """Why `resource_type` is not a FHIR resource type (naming the closest), or None."""
    if resource_model(resource_type) is not None:
        return None
    from fhir.resources.R4B import fhirtypes

    names = [n[: -len("Type")] for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper()]
    close = difflib.get_close_matches(resource_type, names, n=5, cutoff=0.6)
    resources = [n for n in close if resource_model(n) is not None][:1]
    hint = f"; did you mean {resources[0]}?" if resources else ""
    return f"{resource_type!r} is not a FHIR R4 resource type{hint}"


def _is_resource(model: Any) -> bool:
    from fhir.resources.R4B.resource import Resource

    return isinstance(model, type) and issubclass(model, Resource)


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def _primitive_name(marker: Any) -> str | None:
    """The FHIR primitive type a fhir.resources marker stands for: Date() is "date"."""
    return _lower(type(marker).__name__) if type(marker).__module__.startswith("fhir_core") else None


def _lower(name: str) -> str:
    return name[:1].lower() + name[1:]


@functools.cache
def _fields(model: Any) -> dict[str, Any]:
    return {(info.alias or name): info for name, info in model.model_fields.items()}


@functools.cache
def _choices(model: Any) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for info in _fields(model).values():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "one_of_many" in extra:
            seen.setdefault(str(extra["one_of_many"]), extra)
    return list(seen.values())
