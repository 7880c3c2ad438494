"""Each community's whistle list (Longgang 7.3.2) and whistle operator (7.3), from a YAML file.

Appendix A leaves its "may become a whistle event" column blank: each community marks its own
items. The file, validated against the warning catalogue::

    default: {items: all}                 # communities the file does not list
    communities:
      "330383101001":
        items: [2, 4, 8, 9, 11, 13, 15, 30]   # Appendix A item numbers
        types: [gas_leak, water_level]        # warning types with no Appendix A item
        whistle_operator: wang.c01            # the one account that whistles (optional)

Departments a whistle may call are the catalogue's departments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aggregator.cases.rules import CommunityPolicy
from aggregator.errors import ConfigError
from aggregator.grids import COMMUNITY_LENGTH
from contract import Catalogue, default_catalogue

__all__ = ["CommunityList", "WhistleLists", "load_whistle_lists"]


class CommunityList(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: frozenset[int] | Literal["all"] = Field(
        default=frozenset(), description="Appendix A items that may become whistle events"
    )
    types: frozenset[str] = Field(
        default=frozenset(), description="warning types whistle-able whatever their item"
    )
    whistle_operator: str | None = Field(default=None, description="the whistling account")

    @model_validator(mode="after")
    def _items_in_appendix(self) -> CommunityList:
        if self.items != "all":
            bad = sorted(i for i in self.items if not 1 <= i <= 30)
            if bad:
                raise ValueError(f"items: Appendix A has items 1–30, not {bad}")
        return self


class WhistleLists(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: CommunityList = Field(
        default=CommunityList(items="all"), description="for communities not listed"
    )
    communities: dict[str, CommunityList] = Field(default_factory=dict)
    departments: frozenset[str] = Field(
        default=frozenset(), description="filled from the catalogue on load"
    )

    @model_validator(mode="after")
    def _community_codes(self) -> WhistleLists:
        for code in self.communities:
            if len(code) != COMMUNITY_LENGTH or not code.isdigit():
                raise ValueError(f"communities.{code}: a community code has 12 digits")
        return self

    def policy_for(self, community_code: str) -> CommunityPolicy:
        entry = self.communities.get(community_code, self.default)
        return CommunityPolicy(
            whistleable_items=None if entry.items == "all" else entry.items,
            whistleable_types=entry.types,
            departments=self.departments or None,
            whistle_operator=entry.whistle_operator,
        )


def load_whistle_lists(path: Path | str, catalogue: Catalogue | None = None) -> WhistleLists:
    """Load and check a whistle-list file; a bad one is a ConfigError naming the key."""
    cat = catalogue or default_catalogue()
    source = Path(path)
    try:
        with source.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
        lists = WhistleLists.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"whistle lists {source}: {exc}") from exc
    for code, entry in [("default", lists.default), *lists.communities.items()]:
        unknown = sorted(entry.types - set(cat.types))
        if unknown:
            raise ConfigError(f"whistle lists {source}: {code}.types: unknown types {unknown}")
    return lists.model_copy(update={"departments": frozenset(cat.departments)})
