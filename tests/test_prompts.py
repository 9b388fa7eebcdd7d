"""Prompts: template sets and files, readable class names, overrides, per-class prompts."""

from __future__ import annotations

import json

import pytest

from harma.prompts import (
    TEMPLATE_SETS,
    build_prompts,
    clean_class_name,
    fill_template,
    load_templates,
    read_class_names,
    read_class_prompts,
    resolve_class_names,
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("BaseballField", "baseball field"),
        ("baseball_field", "baseball field"),
        ("Dense Residential", "dense residential"),
        ("sparse-residential", "sparse residential"),
        ("01_airport", "airport"),
        ("  Storage__Tanks ", "storage tanks"),
        ("HTTPServer", "http server"),
        ("baseballfield", "baseballfield"),  # one word as far as anyone without a vocabulary can tell
        ("___", "___"),
    ],
)
def test_class_names_are_made_readable(raw, clean):
    assert clean_class_name(raw) == clean


def test_templates_come_from_a_set_a_file_or_a_list(tmp_path):
    assert load_templates("satellite") == ["a satellite photo of {}."]
    path = tmp_path / "templates.txt"
    path.write_text("# mine\na photo of {}.\n\nan aerial view of {c}.\n")
    assert load_templates(path) == ["a photo of {}.", "an aerial view of {c}."]
    assert load_templates(str(path)) == load_templates(path)
    assert fill_template("an aerial view of {c} and {}.", "a port") == "an aerial view of a port and a port."
    assert load_templates(["{} from above"]) == ["{} from above"]


def test_bad_templates_are_named_with_the_file_and_line(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match=r"templates.txt', line 2: the template 'a photo without a slot' has no"):
        load_templates(path)
    with pytest.raises(ValueError, match=r"templates\[1\]: the template 'a {} in {name}' holds braces"):
        load_templates(["{}", "a {} in {name}"])
    with pytest.raises(ValueError, match="neither a template set"):
        load_templates("no_such_set")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no template"):
        load_templates(tmp_path / "empty.txt")
    assert set(TEMPLATE_SETS) >= {"satellite", "remote_sensing"}


def test_overrides_rename_classes_by_data_name_or_cleaned_name(tmp_path):
    raw = ["baseballfield", "DenseResidential", "forest"]
    assert resolve_class_names(raw) == ["baseballfield", "dense residential", "forest"]
    assert resolve_class_names(raw, {"baseballfield": "baseball field", "forest": "woodland"}) == [
        "baseball field", "dense residential", "woodland"]
    assert resolve_class_names(raw, {"dense residential": "housing"})[1] == "housing"
    assert resolve_class_names(raw, clean=False) == raw
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"baseballfield": "baseball field"}))
    assert resolve_class_names(raw, read_class_names(mapping))[0] == "baseball field"
    listing = tmp_path / "names.txt"
    listing.write_text("baseball field\ndense residential area\n\nforest\n")
    assert resolve_class_names(raw, read_class_names(listing)) == ["baseball field", "dense residential area", "forest"]


def test_bad_overrides_are_named(tmp_path):
    raw = ["baseballfield", "forest"]
    with pytest.raises(ValueError, match="'basebal' is not a class of the data; the classes are 'baseballfield', 'forest'"):
        resolve_class_names(raw, {"basebal": "baseball field"})
    with pytest.raises(ValueError, match="class-name list has 3 names but the data has 2 classes"):
        resolve_class_names(raw, ["a", "b", "c"])
    with pytest.raises(ValueError, match="would both be called 'forest'"):
        resolve_class_names(raw, {"baseballfield": "forest"})
    broken = tmp_path / "names.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="names.json' is not valid JSON"):
        read_class_names(broken)
    broken.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="must hold an object of strings"):
        read_class_names(broken)
    with pytest.raises(FileNotFoundError, match="class-name file not found"):
        read_class_names(tmp_path / "absent.json")


def test_class_prompts_replace_the_templates_of_their_class(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"baseballfield": ["an aerial photo of a baseball diamond", "{} seen from above"]}))
    prompts = build_prompts(["baseball field", "forest"], ["a satellite photo of {}."], read_class_prompts(path),
                            raw_names=["baseballfield", "forest"])
    assert prompts == [["an aerial photo of a baseball diamond", "baseball field seen from above"],
                       ["a satellite photo of forest."]]
    with pytest.raises(ValueError, match="class prompts: 'lake' is not a class"):
        build_prompts(["forest"], ["{}"], {"lake": ["a lake"]})
    path.write_text(json.dumps({"forest": []}))
    with pytest.raises(ValueError, match="class 'forest': expected a non-empty list of strings"):
        read_class_prompts(path)
