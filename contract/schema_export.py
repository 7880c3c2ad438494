"""Write the JSON Schema of every v1 message to contract/schema/.

Run ``python -m contract.schema_export``; ``--check`` exits 1 when the committed files differ
from the models, naming the files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.messages import MESSAGE_MODELS

SCHEMA_DIR = Path(__file__).with_name("schema")


def render() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, model in MESSAGE_MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = f"https://community-warning-gateway.invalid/schema/{name}-v1.json"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}-v1.json"] = (
            json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        stale = [
            f
            for f, text in rendered.items()
            if not (SCHEMA_DIR / f).exists() or (SCHEMA_DIR / f).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"stale schema files: {', '.join(stale)}; run python -m contract.schema_export")
            return 1
        return 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for f, text in rendered.items():
        (SCHEMA_DIR / f).write_text(text, encoding="utf-8")
    print(f"wrote {len(rendered)} schema files to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
