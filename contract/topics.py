"""Topic names of the v1 contract, and their parser.

``<prefix>/v1/devices/<device_id>/{alert,telemetry,status,feedback}`` and ``<prefix>/v1/events``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from contract.messages import DEVICE_ID_PATTERN

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class DeviceChannel(StrEnum):
    ALERT = "alert"
    TELEMETRY = "telemetry"
    STATUS = "status"
    FEEDBACK = "feedback"


QOS = {
    DeviceChannel.ALERT: 1,
    DeviceChannel.TELEMETRY: 0,
    DeviceChannel.STATUS: 1,
    DeviceChannel.FEEDBACK: 1,
}
EVENTS_QOS = 1


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    channel: DeviceChannel


class TopicError(ValueError):
    """A topic that is not part of the contract."""


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "cwg"

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or self.prefix.endswith("/"):
            raise TopicError(f"bad topic prefix {self.prefix!r}: no wildcards, no trailing '/'")

    def device(self, device_id: str, channel: DeviceChannel) -> str:
        if not _DEVICE_ID.match(device_id):
            raise TopicError(f"device id {device_id!r} does not match {DEVICE_ID_PATTERN}")
        return f"{self.prefix}/v1/devices/{device_id}/{channel.value}"

    def alert(self, device_id: str) -> str:
        return self.device(device_id, DeviceChannel.ALERT)

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, DeviceChannel.TELEMETRY)

    def status(self, device_id: str) -> str:
        return self.device(device_id, DeviceChannel.STATUS)

    def feedback(self, device_id: str) -> str:
        return self.device(device_id, DeviceChannel.FEEDBACK)

    @property
    def events(self) -> str:
        return f"{self.prefix}/v1/events"

    def device_filter(self, channel: DeviceChannel, share_group: str | None = None) -> str:
        """Subscription filter for one channel of every device, optionally a shared one."""
        flt = f"{self.prefix}/v1/devices/+/{channel.value}"
        return f"$share/{share_group}/{flt}" if share_group else flt

    def parse(self, topic: str) -> ParsedTopic:
        head = f"{self.prefix}/v1/devices/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {head}")
        parts = topic[len(head) :].split("/")
        if len(parts) != 2:
            raise TopicError(f"topic {topic!r}: expected {head}<device_id>/<channel>")
        device_id, channel = parts
        if not _DEVICE_ID.match(device_id):
            raise TopicError(f"topic {topic!r}: bad device id {device_id!r}")
        try:
            return ParsedTopic(device_id, DeviceChannel(channel))
        except ValueError as exc:
            raise TopicError(f"topic {topic!r}: unknown channel {channel!r}") from exc
