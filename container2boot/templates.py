"""Every generated config file comes from a jinja2 template shipped in container2boot/templates."""

import re
from pathlib import Path
from typing import Any

import jinja2

from container2boot import cmdline

_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("container2boot", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def one_line(text: str) -> str:
    """Free text (a title from os-release) on one line: control characters become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def grub_quote(text: str) -> str:
    """A GRUB script word with exactly this value: single quotes keep everything literal but the quote itself."""
    return "'" + text.replace("'", "'\\''") + "'"


def repart_path(path: object) -> str:
    """A path as systemd-repart reads it in CopyFiles= and ExcludeFiles=: C escapes for the characters it would
    take as separators or escapes, `%%` for its specifier character."""
    out = []
    for char in str(path):
        if char == "%":
            out.append("%%")
        elif char == "\\":
            out.append("\\\\")
        elif char in ":\"'" or not char.isprintable() or char.isspace():
            out.append(f"\\x{ord(char):02x}" if ord(char) < 256 else char)
        else:
            out.append(char)
    return "".join(out)


_environment.filters.update(one_line=one_line, grub_quote=grub_quote, repart_path=repart_path,
                            grub_words=cmdline.grub_words)


def render(name: str, **context: Any) -> str:
    return _environment.get_template(name).render(**context)


def render_to(path: Path, name: str, **context: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(name, **context))
    return path
