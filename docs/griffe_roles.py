"""A griffe extension for the API reference: the docstrings' Sphinx roles (``:func:`x```, ``:class:`~y```,
``:mod:``, ``:meth:``, ``:data:``, ``:attr:``) become inline code, which is how Markdown shows them."""
from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", obj.docstring.value))
