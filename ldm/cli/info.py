"""`sd info IMAGE`: the generation parameters a PNG carries (AUTOMATIC1111's "parameters" text)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ldm.cli.app import app


@app.command("info", help="Print the generation parameters stored in an image (AUTOMATIC1111's \"parameters\" text).")
def info(
    image: Annotated[Path, typer.Argument(help="A PNG written by sd (or by AUTOMATIC1111's web UI).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {prompt, negative_prompt, settings} as JSON.")] = False,
) -> None:
    from ldm.files import metadata

    text = metadata.parameters_of_image(image)
    if as_json:
        info = metadata.Infotext.read(text)
        record = {"prompt": info.prompt, "negative_prompt": info.negative_prompt, "settings": info.fields}
        print(metadata.printable(json.dumps(record, ensure_ascii=False, indent=2), json_escapes=True))
    else:
        print(metadata.printable(text))
