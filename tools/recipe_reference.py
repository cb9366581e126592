"""docs/recipes.md, rendered from the recipe dataclasses so that the reference cannot drift from
the schema.

Every key, type, allowed value, default and meaning comes from :mod:`mecqtk.recipe.schema` (field
``doc`` metadata and class docstrings); the quantizer and observer lists come from their
registries; the bundled-recipe table comes from ``recipes/``. Only the prose around them (how
layer rules resolve, the example) is written here.

Regenerate with ``python tools/gen_docs.py`` (all generated pages) or
``python tools/recipe_reference.py > docs/recipes.md``. It lives with the tools, not in the
library: it reads the graph package too (for the rules example), which the recipe package
below it must not import.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from mecqtk.graph.rules import resolve, rule_applies
from mecqtk.quant.registry import OBSERVERS, QUANTIZERS
from mecqtk.recipe.loader import bundled_recipe_dir, bundled_recipes, load_recipe, recipe_from_dict
from mecqtk.recipe.schema import LayerRule, OpKind, QuantizerConfig, Recipe
from mecqtk.recipe.validate import describe_range, to_data

REGENERATE_COMMAND = "python tools/gen_docs.py"

# A layer-rules example, shown in the page and loaded by the tests (so it stays a valid recipe).
RULES_EXAMPLE = """\
quant:
  weight: {bits: 2, granularity: per_channel}
  activation: {bits: 2}
  rules:
    - {match: {name: "layer3.*"}, weight: {bits: 4}}
    - {match: {name: 're:layer[23]\\.0\\.conv1'}, activation: {bits: 4}}
    - {match: {op: [add], name: "layer1.*"}, skip: true}
    - {match: {position: first}, weight: {bits: 8, learn_step: false},
       activation: {bits: 8, learn_step: false}}
    - {match: {position: last}, weight: {bits: 8, learn_step: false},
       activation: {bits: 8, learn_step: false}}
"""

# (name, kind, position) of some cifar_resnet20 layers and ops, as `mecqtk recipe explain` names
# them; the example table resolves the rules above for each.
EXAMPLE_NODES: tuple[tuple[str, OpKind, frozenset[str]], ...] = (
    ("conv1", "conv", frozenset({"first"})),
    ("layer1.0.conv1", "conv", frozenset()),
    ("layer1.0.add", "add", frozenset()),
    ("layer2.0.conv1", "conv", frozenset()),
    ("layer2.0.add_3", "add", frozenset()),
    ("layer3.0.conv1", "conv", frozenset()),
    ("layer3.2.conv2", "conv", frozenset()),
    ("global_pool.pool", "pool", frozenset()),
    ("linear", "linear", frozenset({"last"})),
)


@dataclass(frozen=True)
class KeyDoc:
    """One documented recipe key: a row of a reference table."""

    path: str
    type: str
    allowed: str
    default: str
    doc: str


def yaml_inline(value: Any) -> str:
    """A value as it is written in a recipe: ``true``, ``null``, ``[add, cat, pool]``."""
    text = yaml.safe_dump(to_data(value), default_flow_style=True, width=10_000,
                          sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _code_list(values: typing.Iterable[Any]) -> str:
    return ", ".join(f"`{yaml_inline(v)}`" for v in values)


def describe_type(tp: Any) -> tuple[str, str]:
    """(YAML type, allowed values implied by the type) of a field annotation."""
    origin = get_origin(tp)
    if origin is Literal:
        return "string", _code_list(get_args(tp))
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        described = [describe_type(a) for a in options]
        names = " or ".join(name for name, _ in described)
        allowed = ", ".join(a for _, a in described if a)
        return (f"{names} or null" if type(None) in get_args(tp) else names), allowed
    if origin in (tuple, list):
        name, allowed = describe_type(get_args(tp)[0])
        return f"list of {name}", allowed
    if dataclasses.is_dataclass(tp):
        return "mapping", ""
    names = {bool: "bool", int: "int", float: "number", str: "string"}
    return names[tp], ""


def _allowed(field: dataclasses.Field, tp: Any) -> tuple[str, str]:
    type_name, allowed = describe_type(tp)
    meta = field.metadata
    choices = meta.get("choices")
    if choices is not None:
        allowed = _code_list(sorted(choices()))
    elif meta and describe_range(meta):
        allowed = describe_range(meta)
    return type_name, allowed


def _doc(field: dataclasses.Field) -> str:
    return str(field.metadata.get("doc", "")) if field.metadata else ""


def _markdown(text: str) -> str:
    """Docstring text as Markdown: single backticks, and docs/X.md as a link from docs/."""
    return re.sub(r"docs/(\w+)\.md", r"[docs/\1.md](\1.md)", text.replace("``", "`"))


def class_doc(cls: type) -> str:
    """The class docstring as Markdown; empty when the dataclass has none of its own."""
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclass' generated signature, not a docstring
        return ""
    return _markdown(inspect.cleandoc(doc))


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _is_section_list(tp: Any) -> bool:
    return get_origin(tp) in (tuple, list) and dataclasses.is_dataclass(get_args(tp)[0])


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def key_docs(cls: type, instance: Any, prefix: str) -> list[KeyDoc]:
    """Rows for the plain keys of one section (nested sections get their own tables).

    Defaults are read from ``instance``, the section as the enclosing default builds it: the
    same class can default differently in two places (``quant.weight`` is per-channel and
    signed, ``quant.activation`` is not). Without an instance, from the fields themselves.
    """
    hints = get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if _is_section(tp) or (_is_section_list(tp) and get_args(tp)[0] is LayerRule):
            continue
        if _is_section_list(tp):  # a list of small mappings: the list, then each item's keys
            value = _field_default(field) if instance is None else getattr(instance, field.name)
            rows.append(KeyDoc(f"{prefix}{field.name}", "list of mappings", "",
                               f"`{yaml_inline([to_data(v) for v in value])}`", _doc(field)))
            rows += key_docs(get_args(tp)[0], None, f"{prefix}{field.name}[].")
            continue
        type_name, allowed = _allowed(field, tp)
        value = _field_default(field) if instance is None else getattr(instance, field.name)
        default = f"`{yaml_inline(value)}`"
        rows.append(KeyDoc(f"{prefix}{field.name}", type_name, allowed, default, _doc(field)))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _render_table(rows: list[KeyDoc]) -> list[str]:
    lines = ["| key | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row.path}`", row.type, row.allowed, row.default, row.doc]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _render_section(cls: type, instance: Any, path: str, doc: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`" + (f": {doc}" if doc else ""), ""]
    if class_doc(cls):
        lines += [class_doc(cls), ""]
    rows = key_docs(cls, instance, f"{path}.")
    if rows:
        lines += [*_render_table(rows), ""]
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        child_path = f"{path}.{field.name}"
        if _is_section(tp):
            lines += _render_section(tp, getattr(instance, field.name), child_path,
                                     _doc(field), level + 1)
        elif _is_section_list(tp) and get_args(tp)[0] is LayerRule:
            lines += _render_rules(getattr(instance, field.name), child_path, _doc(field),
                                   level + 1)
    return lines


def _rule_rows(path: str) -> list[KeyDoc]:
    """Every key a rule may hold, as ``quant.rules[].match.name`` and so on."""
    plain = {row.path: row for row in key_docs(LayerRule, None, f"{path}[].")}
    rows = []
    hints = get_type_hints(LayerRule)
    for field in dataclasses.fields(LayerRule):
        key = f"{path}[].{field.name}"
        if _is_section(hints[field.name]):
            rows.append(KeyDoc(key, "mapping", "", "", _doc(field)))
            rows += key_docs(hints[field.name], None, f"{key}.")
        else:
            rows.append(plain[key])
    return rows


def _spec_words(config: QuantizerConfig | None) -> str:
    if config is None:
        return "–"
    step = "learned" if config.learn_step else "calibrated"
    sign = "" if config.signed == "auto" else f" {config.signed}"
    return f"{config.bits}-bit{sign} {config.quantizer} {config.granularity}, {step} step"


def _example_resolution() -> list[str]:
    quant = recipe_from_dict(yaml.safe_load(RULES_EXAMPLE)).quant
    lines = ["| layer / op | kind | matching rules | weight | input |", "|---|---|---|---|---|"]
    for name, kind, position in EXAMPLE_NODES:
        matching = [str(i) for i, rule in enumerate(quant.rules)
                    if rule_applies(rule.match, name, kind, set(position))]
        resolution = resolve(quant, name, kind, set(position))
        if resolution.skipped is not None:
            weight, activation = "float", f"float ({resolution.skipped})"
        else:
            weight, activation = (_spec_words(resolution.weight),
                                  _spec_words(resolution.activation))
        cells = [f"`{name}`", kind, ", ".join(matching) or "none", weight, activation]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def non_default_data(obj: Any) -> Any:
    """The YAML data of a config dataclass without the keys that equal their defaults: a
    section written the way a recipe author would write it."""
    if not dataclasses.is_dataclass(obj):
        return to_data(obj)
    return {f.name: non_default_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) != _field_default(f)}


def _render_rules(rules: tuple[LayerRule, ...], path: str, doc: str, level: int) -> list[str]:
    default_rules = "\n".join(["quant:", "  rules:"] + [
        f"    - {yaml_inline(non_default_data(rule))}" for rule in rules])
    return [
        f"{'#' * level} `{path}`: {doc.split(';')[0]}",
        "",
        "Rules are what makes a recipe mixed-precision. They apply to every quantized Conv/Linear "
        "layer and to every quantized op (matmul, and the add/cat/pool junctions that "
        "`quant.residual` quantizes). For each of them:",
        "",
        "1. mecqtk keeps the rules whose `match` holds. Every condition a match gives must hold: "
        "`name` is matched against the whole name `mecqtk recipe explain` prints (the module "
        "path of a layer, such as `layer1.0.conv1`; the module path and graph node of an op, "
        "such as `layer1.1.add_1`), as a glob or, written `re:<pattern>`, as a regular "
        "expression; `op` lists op kinds; `position` picks the first or last Conv/Linear layer "
        "of the model in execution order.",
        "2. If any of them has `skip: true`, the layer or op stays float; reports name the rule.",
        "3. Otherwise each key of the weight quantizer and of the input quantizer (bits, "
        "quantizer, granularity, observer, signed, learn_step) comes from the first kept rule "
        "that sets it. A key no kept rule sets keeps the section default: `quant.weight`, "
        "`quant.activation`, or `quant.residual` for add/cat/pool.",
        "",
        "A recipe that gives `quant.rules` replaces the default list below, so a recipe that "
        "wants its own rules and still 8-bit first and last layers repeats those two rules. "
        "The default:",
        "",
        "```yaml",
        default_rules,
        "```",
        "",
        *_render_table(_rule_rows(path)),
        "",
        "An example for `cifar_resnet20`, 2-bit by default:",
        "",
        "```yaml",
        RULES_EXAMPLE.rstrip(),
        "```",
        "",
        "Rule 0 raises the weights of the last stage, rule 1 the inputs of the first conv of "
        "stages 2 and 3, rule 2 leaves the residual adds of stage 1 float, rules 3 and 4 are "
        "the defaults kept. What some layers and ops get (the rule numbers are positions in "
        "the list; a sign is only shown where a rule or the section fixes it, `auto` is "
        "decided per value):",
        "",
        *_example_resolution(),
        "",
        "`mecqtk recipe explain --model MODEL --recipe RECIPE` prints this for every layer and "
        "op of a real model.",
        "",
    ]


def _registry_lines() -> list[str]:
    def summary(cls: type) -> str:
        return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ") \
            .replace("``", "`")

    lines = ["## Quantizers and observers", "",
             "The names `quantizer:` and `observer:` accept, from mecqtk's registries.", "",
             "| quantizer | weights | meaning |", "|---|---|---|"]
    for name in sorted(QUANTIZERS):
        cls = QUANTIZERS[name]
        weights = "yes" if getattr(cls, "weight_capable", True) else "no (activations only)"
        lines.append(f"| `{name}` | {weights} | {_cell(summary(cls))} |")
    lines += ["", "| observer | meaning |", "|---|---|"]
    for name in sorted(OBSERVERS):
        lines.append(f"| `{name}` | {_cell(summary(OBSERVERS[name]))} |")
    return [*lines, ""]


def _header_comment(text: str) -> str:
    """The leading `#` comment block of a recipe file, as one paragraph."""
    comment = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return " ".join(comment)


def _bundled_lines() -> list[str]:
    lines = [
        "## Bundled recipes",
        "",
        "Files in `recipes/`; `--recipe` accepts their bare names (`w4a4_lsq.yaml` or "
        "`w4a4_lsq`). `mecqtk recipe show NAME` prints one with every default filled in.",
        "",
        "| recipe | description | weights / activations | first / last layer | epochs | lr | "
        "MEC |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for file_name in bundled_recipes():
        recipe = load_recipe(bundled_recipe_dir() / file_name)
        quant, train = recipe.quant, recipe.train
        ends = sorted({rule.weight.bits for rule in quant.rules
                       if rule.match.position in ("first", "last") and rule.weight.bits})
        cells = [
            f"`{file_name}`", recipe.description,
            f"{quant.weight.bits} / {quant.activation.bits} bits",
            " / ".join(f"{bits} bits" for bits in ends) or "as the rest",
            str(train.epochs), yaml_inline(train.optimizer.lr),
            f"yes (weight {yaml_inline(recipe.mec.weight)})" if recipe.mec.enabled else "no",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        comment = _header_comment((bundled_recipe_dir() / file_name).read_text())
        if comment:
            notes.append(f"- `{file_name}`: {comment}")
    return [*lines, "", *notes, ""]


def render_reference() -> str:
    """docs/recipes.md: every recipe key with its type, allowed values, default and meaning.

    Example:
        >>> from recipe_reference import render_reference
        >>> "`quant.weight.bits`" in render_reference()
        True
    """
    recipe = Recipe()
    lines = [
        f"<!-- Generated from mecqtk/recipe/schema.py by `{REGENERATE_COMMAND}`; "
        "edit the schema, not this file. -->",
        "",
        "# Recipe reference",
        "",
        "A recipe is a YAML file that says what is quantized and how it is trained. It is read "
        "once, at the start of a run, into frozen dataclasses (`mecqtk.recipe.schema`). Every "
        "key is optional: a missing key takes the default below. An unknown key, a value of "
        "the wrong type or out of range stops the run with one line that names the key's "
        "YAML path and what is allowed, e.g. `quant.weight.bits: 9 is out of range; allowed: "
        ">= 2 and <= 8`. `null` means \"not set\" wherever the type allows it.",
        "",
        "`mecqtk recipe show RECIPE` prints a recipe with every default filled in (the same "
        "YAML a run stores as `recipe.yaml`); `mecqtk recipe explain --model MODEL --recipe "
        "RECIPE` prints what it does to each layer of a model.",
        "",
        "A minimal recipe:",
        "",
        "```yaml",
        "name: my_w4a4",
        "description: 4-bit weights and activations, three epochs",
        "quant:",
        "  weight: {bits: 4, granularity: per_channel}",
        "  activation: {bits: 4}",
        "train:",
        "  epochs: 3",
        "  optimizer: {lr: 0.01}",
        "```",
        "",
        "## Top-level keys",
        "",
        *_render_table(key_docs(Recipe, recipe, "")),
        "",
    ]
    hints = get_type_hints(Recipe)
    for field in dataclasses.fields(Recipe):
        tp = hints[field.name]
        if _is_section(tp):
            lines += _render_section(tp, getattr(recipe, field.name), field.name, _doc(field), 2)
    lines += _registry_lines()
    lines += _bundled_lines()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render_reference(), end="")
