"""YAML read strictly: ``yaml.safe_load`` (no Python objects), with a key given twice refused
instead of the last one silently winning, and YAML 1.2's booleans (``true``/``false`` only):
YAML 1.1 also reads ``no``, ``off``, ``yes``, ``on`` as booleans, so ``mixed_precision: no``
arrived as False and was reported as "got 'False'". A key that wants a boolean still takes
those words (the config's ``parse_bool``)."""

import re
from typing import IO

import yaml


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that raises on a mapping with a repeated key; only true/false are booleans."""


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (line "
                                                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def strict_load(stream: "str | IO[str]") -> object:
    """Parse one YAML document safely; a repeated key is a ``yaml.YAMLError`` naming it."""
    return yaml.load(stream, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
