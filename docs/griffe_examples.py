"""griffe extension: read a Google-style ``Example:`` heading as ``Examples:``.

Both spellings appear in jaxl2's docstrings; only ``Examples:`` is a section to griffe, whose
``>>>`` lines it renders as code (the other would become an admonition of plain Markdown).
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleAsExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
