"""The recipe an export records (gradprune.json): what produced the model, in a form that rebuilds it.

:func:`describe_callbacks` writes the gradprune callbacks of a run the way LightningCLI reads them
(``{"class_path", "init_args"}``), so a recipe's callbacks can be built again from it.
"""
from __future__ import annotations

import inspect
from typing import Any


def describe_callbacks(callbacks) -> list[dict]:
    """The gradprune callbacks among ``callbacks`` as ``{"class_path", "init_args"}`` (the LightningCLI
    form, which rebuilds them): each ``__init__`` argument read back from the attribute of the same name, or
    ``<name>_kind``, or the entry of that name in the callback's ``options`` dict; a ``**kwargs`` argument
    from the dict attribute of its name (the one-shot callbacks' ``method_options``), entry by entry."""
    described = []
    for callback in callbacks:
        cls = type(callback)
        if not cls.__module__.startswith("gradprune"):
            continue
        attributes = callback.__dict__
        options = attributes.get("options") if isinstance(attributes.get("options"), dict) else {}
        args: dict[str, Any] = {}
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for name, parameter in inspect.signature(init).parameters.items():
                if parameter.kind == inspect.Parameter.VAR_KEYWORD:
                    for key, value in (attributes.get(name) or {}).items():
                        args.setdefault(key, value)
                if name == "self" or name in args or parameter.kind in (inspect.Parameter.VAR_POSITIONAL,
                                                                        inspect.Parameter.VAR_KEYWORD):
                    continue
                for source, key in ((attributes, name), (attributes, f"{name}_kind"), (options, name)):
                    if key in source:
                        args[name] = source[key]
                        break
        described.append({"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args})
    return described
