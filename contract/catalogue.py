"""The warning catalogue: what each warning type means, who handles it, how it is deduplicated."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.messages import Severity

CATALOGUE_PATH = Path(__file__).with_name("warning_catalogue.yaml")


class Source(StrEnum):
    CAMERA = "camera"
    SENSOR = "sensor"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Department(_Strict):
    zh: str = Field(description="Chinese name, as in Longgang Appendix A")
    en: str = Field(description="English name")


class Category(_Strict):
    zh: str
    en: str


class WarningType(_Strict):
    code: str = Field(description="type code carried in alert.type")
    zh: str = Field(description="Chinese name")
    en: str = Field(description="English name")
    source: Source = Field(description="camera (video AI) or sensor (IoT)")
    appendix_item: int | None = Field(
        ge=1, le=30, description="Longgang Appendix A item number, null where none applies"
    )
    category: Category | None = Field(description="Appendix A category of that item")
    department: str = Field(description="responsible department code")
    severity: Severity = Field(description="default severity")
    handling_deadline: timedelta = Field(description="community handling deadline (8.1)")
    dispatch: Literal["on_site", "off_site"] = Field(description="which 8.3 deadline applies")
    merge_radius_m: float = Field(gt=0, le=5000, description="semantic dedup radius, metres")
    merge_window_s: float = Field(gt=0, le=7 * 86400, description="semantic dedup window, seconds")


class Catalogue(_Strict):
    version: int
    departments: dict[str, Department]
    types: dict[str, WarningType]

    @model_validator(mode="before")
    @classmethod
    def _codes_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("types"), dict):
            data = dict(data)
            data["types"] = {
                code: ({"code": code, **spec} if isinstance(spec, dict) else spec)
                for code, spec in data["types"].items()
            }
        return data

    @model_validator(mode="after")
    def _departments_exist(self) -> Catalogue:
        for code, wt in self.types.items():
            if wt.department not in self.departments:
                raise ValueError(
                    f"types.{code}.department: unknown department {wt.department!r}; "
                    f"known: {sorted(self.departments)}"
                )
        return self

    def get(self, code: str) -> WarningType | None:
        return self.types.get(code)


def load_catalogue(path: Path | str | None = None) -> Catalogue:
    """Load and validate a catalogue file; raises pydantic.ValidationError naming the key path."""
    with Path(path or CATALOGUE_PATH).open(encoding="utf-8") as fh:
        return Catalogue.model_validate(yaml.safe_load(fh))


@lru_cache(maxsize=1)
def default_catalogue() -> Catalogue:
    return load_catalogue()
