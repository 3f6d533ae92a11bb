"""Every generated config file comes from a jinja2 template shipped in container2boot/templates."""

from pathlib import Path
from typing import Any

import jinja2

_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("container2boot", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


def render(name: str, **context: Any) -> str:
    return _environment.get_template(name).render(**context)


def render_to(path: Path, name: str, **context: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(name, **context))
    return path
