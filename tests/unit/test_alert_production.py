"""Association, APDB and alerts through the detector pipeline, without Ray.

Three visits of the simulated field (variables, new transients, movers) run
through four detectors sharing one in-process APDB of two shards, the twin of
the shard actors. Checked against the simulator's truth table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial import cKDTree

from ppray.alerts.packet import validate_alert
from ppray.alerts.sinks import InMemoryAlertSink
from ppray.apdb.backend import ApdbStore, open_store
from ppray.apdb.service import LocalAssociation, ShardRouter, load_shard
from ppray.config import DeploymentConfig, load_config
from ppray.layout import visit_prefix
from ppray.messages import DetectorResult
from ppray.schema import load_alert_schema
from ppray.sim.observatory import SimulatedObservatory
from ppray.skyregion import Footprint
from ppray.visit.processor import DetectorProcessor

N_VISITS = 3
EVERYWHERE = Footprint.box(0.0, 360.0, -90.0, 90.0)


class Night:
    """The processors, their shared APDB and sink, and what each visit gave."""

    def __init__(self, cfg: DeploymentConfig, obs: SimulatedObservatory) -> None:
        self.cfg, self.obs = cfg, obs
        self.router = ShardRouter(2, nside=8)
        self.association = LocalAssociation(
            [load_shard(self.router, k, None) for k in range(2)], self.router
        )
        self.sink = InMemoryAlertSink()
        self.procs = {d: DetectorProcessor.load(cfg, d, self.association) for d in obs.detectors}
        for proc in self.procs.values():
            proc.alert_sink = self.sink
        self.results: dict[int, list[DetectorResult]] = {}

    def run(self, index: int) -> list[DetectorResult]:
        visit = self.obs.visit(index)
        results = []
        for raw in self.obs.expose(visit):
            proc = self.procs[raw.detector]
            result = proc.process(proc.prepare(visit), [raw])
            assert result.status == "ok", result.reason
            assert not any(f.startswith(("alerts_failed", "no_apdb")) for f in result.flags)
            results.append(result)
        self.results[index] = results
        return results

    def alerts(self, index: int) -> list[dict[str, Any]]:
        prefix = visit_prefix(self.obs.visit(index))
        return [a for d in self.obs.detectors for a in self.sink.by_key[f"{prefix}/{d}"]]


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    base = load_config(env={}).rooted_at(str(tmp_path_factory.mktemp("night")))
    cfg = base.with_overrides(
        sim={**base.sim.model_dump(), "n_new_transients": 30, "n_variables": 60, "n_movers": 6}
    )
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    night = Night(cfg, obs)
    for index in range(N_VISITS):
        night.run(index)
    return night


def test_one_valid_alert_per_reliable_dia_source(night: Night) -> None:
    schema = load_alert_schema()
    threshold = night.obs.config.alerts.min_reliability
    for index in range(N_VISITS):
        alerts = night.alerts(index)
        results = night.results[index]
        n_dia = sum(int(r.metrics["n_dia_sources"]) for r in results)
        n_unreliable = sum(int(r.metrics["n_dia_unreliable"]) for r in results)
        # Every DIA source is scored; those below the threshold get no alert.
        scores = np.concatenate([r.dia_sources["reliability"].to_numpy() for r in results])
        assert scores.size == n_dia and np.all((scores >= 0) & (scores <= 1))
        assert n_unreliable == int(np.sum(scores < threshold))
        assert len(alerts) == n_dia - n_unreliable == sum(r.n_alerts for r in results) > 0
        for alert in alerts:
            assert alert["diaSource"]["reliability"] >= threshold
            assert alert["diaSource"]["reliabilityVersion"]
            validate_alert(alert, schema)
            assert schema.packet.deserialize(schema.packet.serialize(alert)) == alert
            source, obj = alert["diaSource"], alert["diaObject"]
            assert source["diaObjectId"] == obj["diaObjectId"]
            assert source["visit"] == night.results[index][0].exposure_id
            assert all(p["diaObjectId"] == obj["diaObjectId"] for p in alert["prvDiaSources"] or [])
            assert all(p["visit"] != source["visit"] for p in alert["prvDiaSources"] or [])


def _truth_variables(night: Night) -> tuple[np.ndarray, np.ndarray]:
    truth = night.obs.transients
    kind = truth["kind"].to_numpy(zero_copy_only=False)
    var = kind == "variable"
    return truth["ra"].to_numpy()[var], truth["dec"].to_numpy()[var]


def test_a_variable_seen_in_every_visit_is_one_object(night: Night) -> None:
    ra, dec = _truth_variables(night)
    cos_dec = np.cos(np.radians(dec.mean()))
    tree = cKDTree(np.c_[ra * cos_dec, dec])
    objects_of: dict[int, list[int]] = {}  # truth variable -> DiaObject id per visit
    last: dict[int, dict[str, Any]] = {}
    for index in range(N_VISITS):
        for alert in night.alerts(index):
            src = alert["diaSource"]
            dist, k = tree.query([src["ra"] * cos_dec, src["dec"]])
            if dist * 3600 < 0.5:
                objects_of.setdefault(int(k), []).append(alert["diaObject"]["diaObjectId"])
                last[int(k)] = alert
    every = [k for k, ids in objects_of.items() if len(ids) == N_VISITS]
    assert len(every) >= 5, {k: len(v) for k, v in objects_of.items()}
    for k in every:
        assert len(set(objects_of[k])) == 1, objects_of[k]
        alert = last[k]
        assert alert["diaObject"]["nDiaSources"] == N_VISITS
        assert len(alert["prvDiaSources"] or []) == N_VISITS - 1
        assert len(alert["prvDiaForcedSources"] or []) >= 1  # forced on the visits it was known


def _rows(apdb: ApdbStore) -> dict[str, pa.Table]:
    tables = apdb.read(EVERYWHERE)
    out = {}
    for name, key in (
        ("dia_objects", "diaObjectId"),
        ("dia_sources", "diaSourceId"),
        ("dia_forced_sources", "diaForcedSourceId"),
    ):
        table = getattr(tables, name)
        # The processing time is when the row was made, different on a re-run by design.
        keep = [c for c in table.column_names if not c.startswith("timeProcessed")]
        out[name] = table.select(keep).sort_by(key)
    return out


def test_apdb_survives_a_shard_restart_and_a_rerun(night: Night) -> None:
    apdb = open_store(night.cfg.apdb, night.cfg.output_root)
    for k, shard in enumerate(night.association.shards):
        again = load_shard(night.router, k, apdb)
        held, restored = shard.snapshot(), again.snapshot()
        assert restored.dia_objects.num_rows == held.dia_objects.num_rows
        assert sorted(restored.dia_objects["diaObjectId"].to_pylist()) == sorted(
            held.dia_objects["diaObjectId"].to_pylist()
        )
    before = _rows(apdb)
    assert before["dia_objects"].num_rows > 0 and before["dia_forced_sources"].num_rows > 0
    alerts_before = night.alerts(N_VISITS - 1)
    night.run(N_VISITS - 1)  # the same visit (same group) again
    after = _rows(apdb)
    for name, table in before.items():
        assert after[name].equals(table), name
    again = night.alerts(N_VISITS - 1)
    assert [a["diaSourceId"] for a in again] == [a["diaSourceId"] for a in alerts_before]
