"""Prompts for zero-shot classification: named template sets, templates from a file, readable
class names from folder names, and the prompts of each class.

A template holds ``{}`` (or ``{c}``, CLIP_benchmark's spelling) where the class name goes:
``"a satellite photo of {}."`` gives ``"a satellite photo of baseball field."``.

Class names come from data (folder names, file-name prefixes, ``classnames.txt``) and are made
readable by `clean_class_name`: ``BaseballField``, ``baseball_field``, ``baseball-field`` and
``Baseball Field`` all become ``baseball field``. A name written as one run of lower-case
letters (``baseballfield``, as in AID's and UC Merced's file names) cannot be split without a
vocabulary and is kept as it is; an override (``{"baseballfield": "baseball field"}``) fixes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_TEMPLATES",
    "TEMPLATE_SETS",
    "build_prompts",
    "clean_class_name",
    "fill_template",
    "load_templates",
    "read_class_names",
    "read_class_prompts",
    "resolve_class_names",
]

_IMAGE_NOUNS = ("satellite image", "aerial image", "remote sensing image")
# CLIP-style variations of one sentence; each is used with every image noun above.
_PHRASINGS = (
    "a {noun} of {{}}.",
    "a {noun} of a {{}}.",
    "a {noun} of the {{}}.",
    "a {noun} showing {{}}.",
    "a {noun} showing a {{}}.",
    "a {noun} containing {{}}.",
    "a low resolution {noun} of {{}}.",
    "a high resolution {noun} of {{}}.",
    "a blurry {noun} of {{}}.",
    "a sharp {noun} of {{}}.",
    "a bright {noun} of {{}}.",
    "a dark {noun} of {{}}.",
    "a cropped {noun} of {{}}.",
    "a close-up {noun} of {{}}.",
    "a large {noun} of {{}}.",
    "{{}} seen in a {noun}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "satellite": ("a satellite photo of {}.",),
    "skyscript": ("a satellite photo of {}.", "a satellite image of {}."),
    "remote_sensing": tuple(phrasing.format(noun=noun) for noun in _IMAGE_NOUNS for phrasing in _PHRASINGS),
}
"""Built-in template sets, by name.

- ``satellite``: the one prompt of RemoteCLIP's published zero-shot figures.
- ``skyscript``: the two prompts of SkyScript's classification benchmark.
- ``remote_sensing``: 48 prompts, 16 CLIP-style phrasings ("a blurry ... of {}.", "a ... showing
  {}.", ...) over three image nouns (satellite image, aerial image, remote sensing image), in
  the spirit of GeoRSCLIP's prompt ensemble.
"""

DEFAULT_TEMPLATES = "satellite"
"""The template set used when none is named."""

_PLACEHOLDER = re.compile(r"\{c?\}")
_NUMBER_PREFIX = re.compile(r"^\d+[\s._-]+(?=\D)")
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_\-]+")


def fill_template(template: str, classname: str) -> str:
    """``template`` with every ``{}`` and ``{c}`` replaced by ``classname``."""
    return _PLACEHOLDER.sub(lambda _: classname, template)


def _check_template(template: object, where: str) -> str:
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{where}: a template must be a non-empty string, got {template!r}")
    if not _PLACEHOLDER.search(template):
        raise ValueError(
            f"{where}: the template {template!r} has no '{{}}' (or '{{c}}') where the class name goes"
        )
    leftover = _PLACEHOLDER.sub("", template)
    if "{" in leftover or "}" in leftover:
        raise ValueError(f"{where}: the template {template!r} holds braces other than '{{}}' and '{{c}}'")
    return template.strip()


def load_templates(templates: str | os.PathLike | Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Templates from a set name (`TEMPLATE_SETS`), a text file or a list of strings.

    A text file holds one template per line; blank lines and lines starting with ``#`` are
    skipped.

    Raises:
        ValueError: an unknown set name that is no file either, an empty file or list, or a
            template without ``{}`` (naming the file and line, or the list index).
    """
    if isinstance(templates, (str, os.PathLike)):
        if isinstance(templates, str) and templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        path = Path(templates)
        if not path.is_file():
            raise ValueError(
                f"templates {str(templates)!r}: neither a template set ({', '.join(TEMPLATE_SETS)}) "
                "nor a text file of templates"
            )
        loaded = []
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                loaded.append(_check_template(line, f"template file '{path}', line {number}"))
        if not loaded:
            raise ValueError(f"template file '{path}' holds no template")
        return loaded
    if not templates:
        raise ValueError("templates: the list is empty")
    return [_check_template(template, f"templates[{index}]") for index, template in enumerate(templates)]


def clean_class_name(raw: str) -> str:
    """A readable class name from a folder name, file-name prefix or label.

    A leading number with a separator goes (``01_airport`` -> ``airport``), camel case is split
    (``BaseballField`` -> ``Baseball Field``), underscores, hyphens and runs of spaces become
    one space, and the result is lower-cased. One run of lower-case letters
    (``baseballfield``) stays as it is: splitting it needs a vocabulary; give an override.
    A name that would become empty is kept as it was.
    """
    name = _NUMBER_PREFIX.sub("", raw.strip())
    name = _CAMEL_BOUNDARY.sub(" ", name)
    name = _SEPARATORS.sub(" ", name).strip().lower()
    return name or raw


def read_class_names(path: str | os.PathLike) -> dict[str, str] | list[str]:
    """Class-name overrides from a file.

    A ``.json`` file holds an object ``{"name in the data": "name to use"}`` or a list of
    names in class order; any other file holds one name per line, in class order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid JSON, or holds something else than described.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: '{path}'")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"class-name file '{path}' is not valid JSON: {error}") from None
    if isinstance(loaded, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()):
        return loaded
    if isinstance(loaded, list) and all(isinstance(name, str) for name in loaded):
        return loaded
    raise ValueError(
        f"class-name file '{path}' must hold an object of strings ({{\"baseballfield\": \"baseball field\"}}) "
        "or a list of strings"
    )


def _key_index(raw_names: Sequence[str], used: Sequence[str], key: str, what: str) -> int:
    """Index of the class that ``key`` names (its name in the data, or its cleaned name)."""
    for names in (raw_names, used):
        if key in names:
            return list(names).index(key)
    shown = ", ".join(repr(name) for name in list(raw_names)[:20]) + (", ..." if len(raw_names) > 20 else "")
    raise ValueError(f"{what}: {key!r} is not a class of the data; the classes are {shown}")


def resolve_class_names(
    raw_names: Sequence[str],
    overrides: Mapping[str, str] | Sequence[str] | None = None,
    clean: bool = True,
) -> list[str]:
    """The names the prompts use, one per class.

    Args:
        raw_names: the names in the data, in label order.
        overrides: ``{name: name to use}`` for some classes (keys are names in the data or
            cleaned names), or a list of every class's name in label order.
        clean: apply `clean_class_name` to the classes without an override.

    Raises:
        ValueError: an override list of another length than the classes, an override key that
            names no class, an empty name, or two classes given the same name.
    """
    used = [clean_class_name(name) if clean else name for name in raw_names]
    if isinstance(overrides, Mapping):
        for key, name in overrides.items():
            used[_key_index(raw_names, used, key, "class-name override")] = name
    elif overrides is not None:
        if len(overrides) != len(raw_names):
            raise ValueError(
                f"class-name list has {len(overrides)} names but the data has {len(raw_names)} classes "
                f"({', '.join(list(raw_names)[:5])}{', ...' if len(raw_names) > 5 else ''})"
            )
        used = list(overrides)
    for index, name in enumerate(used):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class {raw_names[index]!r}: its name {name!r} is empty")
    seen: dict[str, int] = {}
    for index, name in enumerate(used):
        if name in seen:
            raise ValueError(
                f"classes {raw_names[seen[name]]!r} and {raw_names[index]!r} would both be called {name!r}: "
                "give one of them another name"
            )
        seen[name] = index
    return used


def read_class_prompts(path: str | os.PathLike) -> dict[str, list[str]]:
    """Per-class prompts from a JSON file ``{"class": ["prompt", ...]}`` (CuPL-style).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not an object of non-empty lists of strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-prompt file not found: '{path}'")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"class-prompt file '{path}' is not valid JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"class-prompt file '{path}' must hold an object {{\"class\": [\"prompt\", ...]}}")
    for key, prompts in loaded.items():
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"class-prompt file '{path}', class {key!r}: expected a non-empty list of strings")
    return loaded


def build_prompts(
    classnames: Sequence[str],
    templates: Sequence[str],
    class_prompts: Mapping[str, Sequence[str]] | None = None,
    raw_names: Sequence[str] | None = None,
) -> list[list[str]]:
    """The prompts of each class: every template filled with its name, or its own prompts.

    Args:
        classnames: the names used, one per class.
        templates: templates with ``{}``/``{c}`` (see `load_templates`).
        class_prompts: ``{class: [prompt, ...]}`` replacing the templates for some classes;
            keys are used names or names in the data (``raw_names``); a ``{}`` in a prompt is
            filled with the class name.
        raw_names: the names in the data, when they differ from ``classnames``.

    Raises:
        ValueError: a ``class_prompts`` key that names no class, or an empty prompt list.
    """
    prompts = [[fill_template(template, name) for template in templates] for name in classnames]
    for key, own in (class_prompts or {}).items():
        index = _key_index(raw_names if raw_names is not None else classnames, classnames, key, "class prompts")
        if isinstance(own, str) or not own:
            raise ValueError(f"class prompts of {key!r}: expected a non-empty list of strings, got {own!r}")
        prompts[index] = [fill_template(prompt, classnames[index]) for prompt in own]
    return prompts
