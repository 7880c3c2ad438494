"""The aggregator's MQTT session: paho-mqtt driven by a select loop of our own.

``IoLoop`` owns one paho client and one ``FrameChannel`` to the ingest worker. It receives
PUBLISHes into rows, hands them over in frames, and carries out what the worker sends back:
acknowledgements (``manual_ack``) once a batch is committed, and feedback/notice publishes. It
runs single-threaded, in the MQTT I/O process (``ProcessTransport``) or on a thread of the
aggregator (``ThreadTransport``), and reconnects with a growing, jittered delay.

``LeanClient`` is paho's ``Client`` with three hot paths made lean for a consumer that takes
thousands of QoS 1 messages a second (measured with ``bench/bench_mqtt_client.py``):

* reads: one ``recv`` per wakeup into a buffer, and each packet wholly in it cut out at once
  (paho reads the fixed header byte by byte: three or four ``recv`` calls per packet); a
  packet cut off at the buffer's end goes through paho's own reader;
* an incoming PUBLISH (QoS 0 or 1, no MQTT 5 properties) is decoded directly and handed to
  ``on_row``; paho builds a ``Properties`` object for each, which costs more than the rest of
  the packet;
* a QoS 1 publish of bytes without properties builds its packet directly and carries no
  condition variable (nothing waits on it: the loop follows PUBACKs through ``on_publish``);
* a PUBACK without properties reuses one ``ReasonCode`` per code;
* writes: a run of PUBACKs and QoS 1 PUBLISHes goes out in one ``send``, not one per packet.

Everything else (properties present, QoS 2, per-topic callbacks, every other packet) goes
through paho unchanged. The overrides touch private methods of paho 2.1–2.2, so pyproject pins
``paho-mqtt<2.3`` and ``tests/aggregator/test_mqttio.py`` checks both paths.

Incoming QoS 1 messages are paced too: Mosquitto 2.0.11 keeps to the Receive Maximum we announce
only until acknowledgements start to flow (measured: with 200 announced and slow acks, 1,000–1,800
unacknowledged), so the loop stops reading the broker while that many wait for the worker,
unless our own publishes wait for their PUBACKs, which come on the same socket
(``IoLoop._may_read``).

Outgoing QoS 1 publishes are paced by the loop, never queued inside paho: paho's own queue
rescans every in-flight message on each PUBACK, which made a burst of 1,000 feedback messages
cost about 200 µs each.

What waits to go out is bounded in bytes (``mqtt.outgoing_max_bytes``). A city's fleet gets one
feedback message per alert (a device at one alert a second has one outcome per batch: nothing
coalesces), so the outgoing stream is as large as the incoming one; when the broker takes it
more slowly than the pool writer makes it, the loop stops reading the worker's channel while
it is connected, and the writer waits in ``publish`` (back-pressure: ingest slows to what the
broker takes, and no feedback is lost). Only while the broker is unreachable are the oldest
dropped beyond the bound, since then nothing drains them.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aggregator.config import BatchSettings, MqttSettings
from aggregator.gctune import tune_gc
from aggregator.ingest.assemble import Prevalidator
from contract import DeviceChannel, Topics

log = logging.getLogger(__name__)

# (topic, payload, received_at, mid, qos, generation, prevalidated): one received message
Row = tuple[str, bytes, float, int, int, int, tuple[Any, ...] | None]
# (topic, payload, qos): one message to publish
Outgoing = tuple[str, bytes, int]

_READ_CHUNK = 1 << 18
_WRITE_CHUNK = 1 << 18
_HEADER = struct.Struct("!I")
_PUBACK_PROPS = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
_PUBACK_CODES: dict[int, ReasonCode] = {}
_QUEUED = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)


class _LeanInfo(mqtt.MQTTMessageInfo):
    """An MQTTMessageInfo without its condition variable: the I/O loop learns of PUBACKs
    through on_publish and never waits on a message."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:  # no super().__init__: that builds the Condition
        self.mid = mid
        self._published = False
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        self._published = True

    def wait_for_publish(self, timeout: float | None = None) -> None:
        raise RuntimeError("messages published on the lean path are followed with on_publish")


class _LeanMessage(mqtt.MQTTMessage):
    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, payload: bytes) -> None:
        self.timestamp = mqtt.time_func()
        self.state = mqtt.mqtt_ms_wait_for_puback
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = 1
        self.retain = False
        self.info = _LeanInfo(mid)
        self.properties = None


def publish_packet(topic: bytes, mid: int, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH, QoS 1, no properties: what paho's _send_publish builds."""
    remaining = 2 + len(topic) + 2 + 1 + len(payload)
    header = bytearray(b"\x32")  # PUBLISH, QoS 1
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        header.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    return b"".join(
        (header, len(topic).to_bytes(2, "big"), topic, mid.to_bytes(2, "big"), b"\x00", payload)
    )


def _in_packet(command: int, length: int, mult: int, packet: bytearray) -> Any:
    """paho's incoming-packet state: a whole packet read (``command`` 0: none under way)."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": mult,
        "remaining_length": length,
        "packet": packet,
        "to_process": 0,
        "pos": 0,
    }


class LeanClient(mqtt.Client):
    """paho's Client with lean read, PUBLISH-in and PUBACK-in paths (see the module text)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rbuf_sock: object = None
        # topic bytes, payload, mid, qos: set it to receive PUBLISHes without an MQTTMessage
        self.on_row: Callable[[bytes, bytes, int, int], None] | None = None
        # how long one loop_read may go on handling buffered packets
        self.read_budget_s = 0.005

    def buffered(self) -> bool:
        """Bytes already read from the socket but not yet parsed (select will not see them)."""
        if self._rbuf and self._rbuf_sock is self._sock:
            return True
        pending = getattr(self._sock, "pending", None)  # TLS: decrypted, not yet read
        return bool(pending is not None and pending() > 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read the socket once, then handle every complete packet in the buffer, within
        ``read_budget_s`` so that writes (and the loop's other work) get their turn."""
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        deadline = time.monotonic() + self.read_budget_s
        handled = 0
        while True:
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN or self._sock is None or not self.buffered():
                break
            handled += 1
            if handled & 63 == 0 and time.monotonic() > deadline:
                break
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_read(self) -> MQTTErrorCode:
        """One packet from the buffer (one recv when it is empty). A packet wholly in the buffer
        is cut out at once; one only partly there goes through paho's byte-by-byte reader,
        which keeps its state until the rest arrives."""
        if self._in_packet["command"]:
            return super()._packet_read()  # paho is midway through a packet
        buf = self._buffer()
        if not buf:
            try:
                data = mqtt.Client._sock_recv(self, _READ_CHUNK)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:  # TimeoutError included
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if not data:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            buf += data
        n = len(buf)
        length, mult, i = 0, 1, 1
        while True:
            if i >= n or i > 4:  # length incomplete (or malformed: paho says so)
                return super()._packet_read()
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult <<= 7
            i += 1
            if not byte & 0x80:
                break
        end = i + length
        if end > n:
            return super()._packet_read()
        command = buf[0]
        kind = command & 0xF0
        if kind == mqtt.PUBLISH:
            rc = self._lean_publish(command, buf, i, end)
            if rc is not None:
                del buf[:end]
                return rc
        elif kind == mqtt.PUBACK:
            rc = self._lean_puback(buf, i, end)
            if rc is not None:
                del buf[:end]
                return rc
        # any other packet: to paho's handlers, in the state its own reader leaves them
        self._in_packet = _in_packet(command, length, mult, bytearray(buf[i:end]))
        del buf[:end]
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = _in_packet(0, 0, 1, bytearray())
        return rc

    def _buffer(self) -> bytearray:
        """The read buffer of the current connection (a new one starts empty)."""
        if self._sock is not self._rbuf_sock:
            self._rbuf = bytearray()
            self._rbuf_sock = self._sock
        return self._rbuf

    def _sock_recv(self, bufsize: int) -> bytes:
        buf = self._buffer()
        if not buf:
            # paho finishing a packet that straddled our buffer's end: only that packet's
            # bytes, so a loop_read takes no more than one buffer (and the Receive Maximum
            # holds, IoLoop._unacked)
            return super()._sock_recv(bufsize)
        out = bytes(buf[:bufsize])
        del buf[:bufsize]
        return out

    def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """paho's publish; a QoS 1 message of bytes without properties, sent at once (no
        max_inflight queue), skips the per-message condition variable and packet logging."""
        if (
            qos != 1
            or retain
            or properties is not None
            or type(payload) is not bytes
            or self._max_inflight_messages != 0
            or self._sock is None
            or not topic
            or "+" in topic
            or "#" in topic
        ):
            return super().publish(topic, payload, qos, retain, properties)
        topic_bytes = topic.encode("utf-8")
        mid = self._mid_generate()
        message = _LeanMessage(mid, topic_bytes, payload)
        with self._out_message_mutex:
            if mid in self._out_messages:  # 65,535 in flight: let paho report it
                return super().publish(topic, payload, qos, retain, properties)
            self._out_messages[mid] = message
            self._inflight_messages += 1
        self._packet_queue(mqtt.PUBLISH | 0x02, publish_packet(topic_bytes, mid, payload), mid, 1)
        return message.info

    def ack_many(self, mids: list[int]) -> MQTTErrorCode:
        """``ack(mid, 1)`` for each of ``mids`` (manual_ack), queued as one run of PUBACKs:
        the same bytes paho writes (fixed header 0x40 0x02, then the mid)."""
        if not self._manual_ack or not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        packet = struct.pack(f"!{len(mids)}I", *[0x4002_0000 | mid for mid in mids])
        return self._packet_queue(mqtt.PUBACK, packet, 0, 1)

    def _packet_write(self) -> MQTTErrorCode:
        """paho writes one packet per send(). PUBACKs and QoS 1 PUBLISHes need nothing once
        written, so a run of them at the head of the queue goes out in one send()."""
        out = self._out_packet
        run: list[Any] = []
        size = 0
        for pkt in out:
            cmd = pkt["command"] & 0xF0
            if not (cmd == mqtt.PUBACK or (cmd == mqtt.PUBLISH and pkt["qos"] > 0)):
                break
            run.append(pkt)
            size += pkt["to_process"]
            if size >= _WRITE_CHUNK:
                break
        if len(run) < 2:
            return super()._packet_write()
        data = b"".join(memoryview(p["packet"])[p["pos"] :] for p in run)
        try:
            sent = self._sock_send(data)
        except (AttributeError, ValueError):
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        for pkt in run:
            if sent >= pkt["to_process"]:
                sent -= pkt["to_process"]
                out.popleft()
            else:  # partly written: the rest when the socket has room again
                pkt["pos"] += sent
                pkt["to_process"] -= sent
                return MQTTErrorCode.MQTT_ERR_AGAIN
        return self._packet_write() if out else MQTTErrorCode.MQTT_ERR_SUCCESS

    def _lean_publish(
        self, command: int, packet: bytearray, start: int, end: int
    ) -> MQTTErrorCode | None:
        """A PUBLISH (QoS 0 or 1, no properties) straight to ``on_row``; None leaves it to
        paho (no ``on_row``, QoS 2, properties, per-topic callbacks, malformed)."""
        on_row = self.on_row
        qos = (command & 0x06) >> 1
        if on_row is None or qos > 1 or self._on_message_filtered._root._children:
            return None
        try:
            pos = start + 2 + ((packet[start] << 8) | packet[start + 1])
            topic = bytes(packet[start + 2 : pos])
            mid = 0
            if qos:
                mid = (packet[pos] << 8) | packet[pos + 1]
                pos += 2
            if pos >= end or packet[pos] != 0 or not topic:
                return None
        except IndexError:
            return None
        on_row(topic, bytes(packet[pos + 1 : end]), mid, qos)
        if qos and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _lean_puback(self, packet: bytearray, start: int, end: int) -> MQTTErrorCode | None:
        """A PUBACK without properties, with one cached ReasonCode per code; None leaves it to
        paho."""
        n = end - start
        if not (2 <= n <= 3 or (n == 4 and packet[start + 3] == 0)):
            return None
        mid = (packet[start] << 8) | packet[start + 1]
        code = packet[start + 2] if n > 2 else 0
        reason = _PUBACK_CODES.get(code)
        if reason is None:
            reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
            _PUBACK_CODES[code] = reason
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _PUBACK_PROPS)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        rc = self._lean_publish(self._in_packet["command"], packet, 0, len(packet))
        return super()._handle_publish() if rc is None else rc

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        if cmd == "PUBACK":
            packet = self._in_packet["packet"]
            rc = self._lean_puback(packet, 0, len(packet))
            if rc is not None:
                return rc
        return super()._handle_pubackcomp(cmd)


class ChannelClosedError(Exception):
    """The other end of a frame channel is gone."""


class FrameChannel:
    """Length-prefixed pickle frames over a stream socket.

    ``put`` never blocks: frames wait in a buffer until ``flush`` gets them out, so the I/O loop
    keeps serving the broker while the worker is busy. ``send`` (the worker's side) blocks.
    """

    def __init__(self, sock: socket.socket, *, blocking: bool) -> None:
        self.sock = sock
        sock.setblocking(blocking)
        self._rbuf = bytearray()
        self._wbuf = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    @staticmethod
    def _frame(message: tuple[Any, ...]) -> bytes:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        return _HEADER.pack(len(data)) + data

    def put(self, message: tuple[Any, ...]) -> None:
        self._wbuf += self._frame(message)

    def pending_bytes(self) -> int:
        return len(self._wbuf)

    def flush(self) -> None:
        """Send what the socket takes now (non-blocking sockets)."""
        buf = self._wbuf
        while buf:
            try:
                n = self.sock.send(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                raise ChannelClosedError(str(exc)) from exc
            del buf[:n]

    def send(self, message: tuple[Any, ...]) -> None:
        """Send one frame, waiting for room (blocking sockets)."""
        try:
            self.sock.sendall(self._frame(message))
        except OSError as exc:
            raise ChannelClosedError(str(exc)) from exc

    def receive(self) -> list[Any]:
        """Every complete frame readable now; call when select says the socket is readable."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            data = None
        except OSError as exc:
            raise ChannelClosedError(str(exc)) from exc
        if data is not None:
            if not data:
                raise ChannelClosedError("closed by the other end")
            self._rbuf += data
        out = []
        buf = self._rbuf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            if len(buf) - pos - _HEADER.size < size:
                break
            start = pos + _HEADER.size
            # frames come only from the other end of our own socket pair
            out.append(pickle.loads(buf[start : start + size]))  # noqa: S301
            pos = start + size
        del buf[:pos]
        return out

    def close(self) -> None:
        self.sock.close()


class IoLoop:
    """One MQTT session and one channel to the worker, served by a select loop (module text).

    To the worker: ``("state", connected)`` and ``("rows", [Row, ...])``.
    From the worker: ``("ack", [(mid, qos, generation), ...])``, ``("publish", [Outgoing])``
    and ``("stop",)``.
    """

    # rows waiting for the worker beyond which we stop reading the broker (TCP holds the rest)
    _MAX_CHANNEL_BYTES = 16 << 20
    # back-pressure is logged at most this often
    _BACK_PRESSURE_LOG_S = 10.0
    # the broker socket is read at most this often (adds at most this much latency)
    _READ_EVERY_S = 0.002

    def __init__(
        self,
        settings: MqttSettings,
        batching: BatchSettings,
        channel: FrameChannel,
        prevalidator: Prevalidator | None = None,
    ):
        self.settings = settings
        self.prevalidator = prevalidator
        self._now = datetime.now(UTC)  # the clock alerts are checked against, per read
        self.batching = batching
        self.channel = channel
        self.topics = Topics(settings.topic_prefix)
        self._rows: list[Row] = []
        self._first_row_at = 0.0
        self._flush_after = min(batching.linger_ms, 5.0) / 1000
        self._topic_text: dict[bytes, str] = {}
        self._generation = 0
        self._connected = False
        self._reported: bool | None = None
        self._out: deque[Outgoing] = deque()
        self._out_bytes = 0  # topic + payload bytes in _out
        self._max_out_bytes = settings.outgoing_max_bytes
        # the broker is connected and _out is full: the worker's channel is not read (it waits)
        self._holding_back = False
        self._back_pressure_episodes = 0
        self._next_back_pressure_log = 0.0
        self._dropping = False  # dropping the oldest while the broker is unreachable
        self._inflight: set[int] = set()  # mids of QoS 1 publishes the broker has not acked
        self._window = 1000
        self._dropped_out = 0
        self._stopping = False
        self._next_connect = 0.0
        self._delay = settings.reconnect_min_s
        self._connect_called = False
        self._last_read = 0.0
        # QoS 1 messages received on this connection and not yet acknowledged: at the Receive
        # Maximum we stop reading and TCP holds the broker back (module text)
        self._unacked = 0
        self._next_misc = 0.0
        self.client = self._make_client()

    def _make_client(self) -> LeanClient:
        s = self.settings
        client = own_loop_client(s.client_id, manual_ack=True)
        client.username_pw_set(s.username, s.secret())
        if s.tls_ca is not None:
            client.tls_set(ca_certs=str(s.tls_ca))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_row = self._on_row
        return client

    # -- paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "broker refused connection reason=%s: check the aggregator's username/password "
                "and the broker's ACL",
                reason_code,
            )
            return
        self._generation += 1
        self._unacked = 0  # the broker redelivers the last connection's on this one
        self._connected = True
        self._delay = self.settings.reconnect_min_s  # a good connection: start small again
        server_max = getattr(properties, "ReceiveMaximum", 65535) if properties else 65535
        self._window = max(1, min(int(server_max), 65535))
        group = self.settings.share_group
        client.subscribe(
            [
                (self.topics.device_filter(DeviceChannel.ALERT, group), 1),
                (self.topics.device_filter(DeviceChannel.STATUS, group), 1),
                (self.topics.device_filter(DeviceChannel.TELEMETRY, group), 1),
            ]
        )
        log.info(
            "connected session_present=%s generation=%s out_window=%s",
            flags.session_present,
            self._generation,
            self._window,
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected = False
        if not self._stopping:
            log.warning("disconnected from broker reason=%s; reconnecting", reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, *_: Any) -> None:
        # also called for QoS 0 publishes once written; their mids are not in the set
        self._inflight.discard(mid)

    def _on_row(self, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        text = self._topic_text.get(topic)
        if text is None:
            if len(self._topic_text) > 100_000:  # bounded: a fleet has fewer device topics
                self._topic_text.clear()
            text = self._topic_text[topic] = topic.decode("utf-8", "replace")
        if not self._rows:
            self._first_row_at = time.monotonic()
        pre = None
        if self.prevalidator is not None:
            try:
                pre = self.prevalidator.check(text, payload, self._now)
            except Exception:  # no message may end this loop: the pool writer decides instead
                log.exception("prevalidation of a message on %s failed", text)
        self._rows.append((text, payload, time.time(), mid, qos, self._generation, pre))
        if qos:
            self._unacked += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # PUBLISHes the lean path leaves to paho (those with MQTT 5 properties)
        self._on_row(msg._topic, bytes(msg.payload), msg.mid, msg.qos)  # raw topic bytes

    # -- the loop

    def run(self) -> None:
        """Serve until the worker says stop or its channel closes."""
        client = self.client
        channel = self.channel
        try:
            while not self._stopping:
                sock = client.socket()
                now = time.monotonic()
                if sock is None and now >= self._next_connect:
                    self._connect()
                    sock = client.socket()
                self._report_state()
                holding_back = self._hold_back()
                # Full and connected: the worker's next publish waits until the broker has
                # taken enough (module text); its acknowledgements wait behind it in order.
                rlist: list[Any] = [] if holding_back else [channel]
                wlist: list[Any] = []
                timeout = 1.0
                if sock is not None:
                    # Messages trickling in from many devices would wake us once each: read at
                    # most every _READ_EVERY_S, so each round takes what arrived meanwhile.
                    read_at = self._last_read + self._READ_EVERY_S
                    if now < read_at:
                        timeout = read_at - now
                    elif self._may_read(holding_back):
                        rlist.append(sock)
                    if client.want_write():
                        wlist.append(sock)
                    if client.buffered():
                        timeout = 0.0
                else:
                    timeout = max(0.0, min(timeout, self._next_connect - now))
                if channel.pending_bytes():
                    wlist.append(channel)
                if self._rows:
                    timeout = max(0.0, min(timeout, self._first_row_at + self._flush_after - now))
                readable, _, _ = select.select(rlist, wlist, [], timeout)
                if channel in readable:
                    for command in channel.receive():
                        self._command(command)
                if sock is not None and client.socket() is sock:
                    if sock in readable or client.buffered():
                        self._read()
                        self._last_read = time.monotonic()
                    self._pump_out()
                    if client.want_write() and client.socket() is not None:
                        client.loop_write()
                    if client.socket() is not None and now >= self._next_misc:
                        client.loop_misc()  # keepalive: PINGREQ when due, and its timeout
                        self._next_misc = now + 0.25
                self._flush_rows()
                channel.flush()
        except ChannelClosedError:
            # The worker is gone. Nothing more is acknowledged: the broker keeps the session's
            # unacknowledged messages for the next aggregator.
            self._stopping = True
            log.debug("worker channel closed; I/O loop ends")
        finally:
            if client.socket() is not None:
                client.disconnect()
                client.loop_write()

    def _connect(self) -> None:
        s = self.settings
        try:
            if not self._connect_called:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = s.session_expiry_s
                props.ReceiveMaximum = s.receive_maximum
                log.info(
                    "connecting broker=%s:%s client_id=%s receive_maximum=%s",
                    s.host,
                    s.port,
                    s.client_id,
                    s.receive_maximum,
                )
                self.client.connect(
                    s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props
                )
                self._connect_called = True
            else:
                self.client.reconnect()
        except OSError as exc:
            delay = self._next_delay()
            log.warning(
                "cannot reach broker %s:%s (%s); retrying in %.1f s", s.host, s.port, exc, delay
            )
            self._next_connect = time.monotonic() + delay
            return
        # the next attempt, should this session fail before CONNACK, waits the current delay
        self._next_connect = time.monotonic() + self._next_delay()

    def _next_delay(self) -> float:
        """The wait before the next attempt: random in [d/2, d], d doubling up to the cap.

        The cap is small (``reconnect_max_s``, 2 s) so ingest resumes within seconds of the
        broker's return; the randomness keeps replicas from reconnecting in step.
        """
        ceiling = min(self._delay, self.settings.reconnect_max_s)
        self._delay = min(self._delay * 2, self.settings.reconnect_max_s)
        return random.uniform(ceiling / 2, ceiling)

    def _read(self) -> None:
        self._now = datetime.now(UTC)
        # LeanClient.loop_read goes on while its buffer holds packets (bounded)
        self.client.loop_read()

    def _command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "ack":
            if not self._connected:
                return
            generation = self._generation
            # A message from an earlier connection is not ours to acknowledge any more: the
            # broker redelivers it on this one, and the pool's key makes that a no-op.
            mids = [mid for mid, qos, gen in command[1] if qos == 1 and gen == generation]
            self.client.ack_many(mids)
            self._unacked -= len(mids)
        elif kind == "publish":
            messages = command[1]
            self._out.extend(messages)
            self._out_bytes += sum(len(t) + len(p) for t, p, _ in messages)
            if not self._connected:
                self._drop_oldest()
        elif kind == "stop":
            self._stopping = True
        else:  # pragma: no cover - both ends are this module
            log.error("unknown command %r from the worker", kind)

    def _may_read(self, holding_back: bool) -> bool:
        """Whether this round reads the broker's socket.

        Incoming alerts are held to the Receive Maximum by not reading (module text). But the
        broker's PUBACKs for our feedback come on the same socket: left unread at the Receive
        Maximum, feedback drained about one window per commit, and with one feedback message
        per alert (a city's fleet) it fell ever further behind. So while publishes are in
        flight the socket is read on, the rows bounded then by the bytes waiting for the
        worker (``_MAX_CHANNEL_BYTES``) instead; while the worker is held back (it waits on
        us, and acknowledges nothing, so the broker keeps to the Receive Maximum) without
        that bound, or neither side would move."""
        room = self.channel.pending_bytes() < self._MAX_CHANNEL_BYTES
        if room and self._unacked < self.settings.receive_maximum:
            return True
        return bool(self._inflight) and (room or holding_back)

    def _hold_back(self) -> bool:
        """Whether the worker's channel waits this round: connected, and _out at its bound
        (until it is down to half of it, so that the writer goes on for a while between
        episodes rather than one frame at a time). Logged when an episode starts, at most
        every ``_BACK_PRESSURE_LOG_S`` with the number of episodes since."""
        limit = self._max_out_bytes if not self._holding_back else self._max_out_bytes // 2
        holding = self._connected and self._out_bytes >= limit
        if holding != self._holding_back:
            self._holding_back = holding
            if holding:
                self._back_pressure_episodes += 1
                now = time.monotonic()
                if now >= self._next_back_pressure_log:
                    self._next_back_pressure_log = now + self._BACK_PRESSURE_LOG_S
                    log.warning(
                        "the broker takes feedback and notices more slowly than they are "
                        "made: %s messages (%.1f MiB) wait for it, and the pool writer waits "
                        "until it has taken half (back-pressure, nothing dropped; %s times "
                        "since the last such message)",
                        len(self._out),
                        self._out_bytes / (1 << 20),
                        self._back_pressure_episodes,
                    )
                    self._back_pressure_episodes = 0
            elif self._connected:  # (a lost connection says so itself)
                log.debug("the broker caught up with feedback and notices; the writer goes on")
        return holding

    def _drop_oldest(self) -> None:
        """While the broker is unreachable nothing drains _out: keep it within its bound by
        dropping the oldest messages (a device resends an alert whose feedback never came)."""
        out = self._out
        dropped = 0
        while self._out_bytes > self._max_out_bytes and out:
            topic, payload, _ = out.popleft()
            self._out_bytes -= len(topic) + len(payload)
            dropped += 1
        if dropped:
            self._dropped_out += dropped
            if not self._dropping:
                log.warning(
                    "broker unreachable: feedback and notices beyond %.1f MiB are dropped, "
                    "oldest first (%s so far)",
                    self._max_out_bytes / (1 << 20),
                    self._dropped_out,
                )
            self._dropping = True

    def _pump_out(self) -> None:
        if not self._connected:
            return
        if self._dropping:
            self._dropping = False
            log.warning(
                "broker reachable again; %s feedback/notices dropped in all", self._dropped_out
            )
        out = self._out
        publish = self.client.publish
        inflight = self._inflight
        room = self._window - len(inflight)
        sent = 0
        while out and room > 0:
            topic, payload, qos = out.popleft()
            sent += len(topic) + len(payload)
            info = publish(topic, payload, qos=qos)
            if qos and info.rc in _QUEUED:  # NO_CONN: paho sends it after the reconnect
                inflight.add(info.mid)
                room -= 1
            elif qos:
                log.warning("publish to %s refused by the client (%s); dropped", topic, info.rc)
        self._out_bytes -= sent

    def _flush_rows(self) -> None:
        if self._rows and (
            len(self._rows) >= self.batching.max_messages
            or time.monotonic() - self._first_row_at >= self._flush_after
        ):
            self.channel.put(("rows", self._rows))
            self._rows = []

    def _report_state(self) -> None:
        if self._connected != self._reported:
            self._reported = self._connected
            self.channel.put(("state", self._connected))


def _ignore(*_: Any) -> None:
    return None


def own_loop_client(client_id: str, *, manual_ack: bool = False) -> LeanClient:
    """A MQTT 5 ``LeanClient`` for a select loop of the caller's own: QoS 1 publishes paced by
    the caller (paho's max_inflight off, which the lean publish path needs) and writes made by
    the caller's ``loop_write`` after each round, not one send() per packet queued."""
    client = LeanClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    client.max_inflight_messages_set(0)
    client.on_socket_register_write = _ignore
    client.on_socket_unregister_write = _ignore
    return client


def serve(
    settings: MqttSettings,
    batching: BatchSettings,
    sock: socket.socket,
    prevalidator: Prevalidator | None = None,
) -> None:
    """Run an ``IoLoop`` on ``sock`` (one end of a socket pair) until told to stop."""
    try:
        IoLoop(settings, batching, FrameChannel(sock, blocking=False), prevalidator).run()
    finally:
        sock.close()  # the worker sees the end of the channel, whatever ended the loop


def child_main(
    conn: Any,
    config: dict[str, Any],
    secret: str | None,
    level: int,
    prevalidator: Prevalidator | None = None,
) -> None:
    """The MQTT I/O process. ``conn`` is the child's end of a ``multiprocessing.Pipe``; the
    password comes in the spawn arguments (a pipe), never on the command line or in the
    environment."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[io] %(message)s")
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    settings = MqttSettings.model_validate({**config["mqtt"], "password": secret})
    batching = BatchSettings.model_validate(config["batch"])
    tune_gc()  # as in the writer: tens of thousands of short-lived rows a second
    serve(settings, batching, sock, prevalidator)
    # Told to stop, or the parent is gone (SIGKILL): leave at once, acknowledging nothing more.
    os._exit(0)
