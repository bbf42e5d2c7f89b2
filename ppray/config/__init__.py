"""Deployment configuration: frozen pydantic models from YAML, overridable from the environment.

Nothing is read at import time. :func:`load_config` reads a YAML file (or the
embedded default ``configs/deployments/local.yaml``) and then applies
environment overrides named ``PPRAY_<FIELD>`` for top-level fields and
``PPRAY_<SECTION>__<FIELD>`` for nested ones, e.g. ``PPRAY_OUTPUT_ROOT=s3://b/out``
or ``PPRAY_WORKER__NUM_CPUS=1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ppray.config.kafka import KafkaConfig, KafkaTopics

__all__ = [
    "ActorOptions",
    "AlertConfig",
    "ApdbConfig",
    "CalibSurveys",
    "CalibrationConfig",
    "CombineOptions",
    "DefectOptions",
    "DeploymentConfig",
    "DetectionConfig",
    "KafkaConfig",
    "KafkaTopics",
    "Pipeline",
    "PipelineRule",
    "PipelinesConfig",
    "RealisticSkyConfig",
    "S3Config",
    "SimConfig",
    "SourceConfig",
    "default_config_path",
    "load_config",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ActorOptions(_Frozen):
    """Ray options of one kind of actor (passed to ``.options()`` by the factory)."""

    num_cpus: float = Field(default=0.0, ge=0)
    memory_mb: int | None = Field(default=None, ge=1)
    max_restarts: int = Field(default=-1, ge=-1)
    max_task_retries: int = Field(default=0, ge=-1)
    max_concurrency: int = Field(default=64, ge=1)
    resources: dict[str, float] = Field(default_factory=dict)
    scheduling_strategy: Literal["DEFAULT", "SPREAD"] = Field(
        default="DEFAULT",
        description="SPREAD: place these actors across nodes, one per node in turn.",
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the actor's process; OMP_NUM_THREADS defaults to its CPUs.",
    )


class SourceConfig(_Frozen):
    """Where ``ppray run`` reads ``next_visit`` and raw-arrival events from."""

    kind: Literal["memory", "directory", "kafka"] = Field(
        default="directory", description="kafka: the topics of the deployment's kafka section."
    )
    path: str = "ppray-inbox"
    poll_interval_s: float = Field(default=0.2, gt=0)


class DetectionConfig(_Frozen):
    """Single-frame detection parameters."""

    threshold_sigma: float = Field(default=5.0, gt=0)
    min_area_px: int = Field(default=5, ge=1)
    aperture_radius_px: float = Field(default=6.0, gt=0)
    background_box_px: int = Field(default=128, ge=8)
    cosmic_ray_niter: int = Field(default=2, ge=1, le=4)
    seeing_guess_arcsec: float = Field(
        default=0.8, gt=0, description="FWHM assumed before the PSF is measured."
    )
    dia_threshold_sigma: float = Field(default=5.0, gt=0)
    reliability: bool = Field(
        default=True, description="Score every DIA source's reliability (0-1)."
    )
    reliability_model: str | None = Field(
        default=None, description="A model file (.npz); None: the one shipped with ppray."
    )
    streaks: Literal["one_per_streak", "none", "off"] = Field(
        default="one_per_streak",
        description="Satellite trails on the difference: masked (STREAK) and reported as one "
        "trailed DIA source each, masked with no source (none), or not looked for (off).",
    )


class RealisticSkyConfig(_Frozen):
    """The knobs of the simulator's realistic sky (``sim.sky: realistic``; docs/simulator.md)."""

    psf_fwhm_variation: float = Field(
        default=0.08, ge=0, lt=0.5, description="Largest fractional FWHM change over a detector."
    )
    psf_ellipticity_max: float = Field(
        default=0.4, ge=0, lt=0.9, description="Largest PSF ellipticity (1 - b/a) on a detector."
    )
    template_fwhm_arcsec: tuple[float, float] = Field(
        default=(0.6, 0.7), description="Range of the template (coadd) PSF's FWHM."
    )
    template_ellipticity_max: float = Field(default=0.1, ge=0, lt=0.9)
    blend_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Fraction of stars given a close companion."
    )
    blend_separation_fwhm: tuple[float, float] = Field(
        default=(1.0, 3.0), description="Companion separation, in the nominal seeing's FWHM."
    )
    blend_delta_mag: tuple[float, float] = Field(
        default=(0.0, 2.0), description="How much fainter the companion is (mag)."
    )
    galaxy_density_per_deg2: float = Field(default=30000.0, ge=0)
    galaxy_mag_range: tuple[float, float] = (18.0, 24.0)
    galaxy_hlr_arcsec: tuple[float, float] = Field(
        default=(0.3, 2.0), description="Range of galaxies' half-light radii."
    )
    galaxy_ellipticity_max: float = Field(default=0.7, ge=0, lt=0.9)
    galaxy_bulge_fraction: float = Field(
        default=0.3, ge=0, le=1, description="de Vaucouleurs-like galaxies; the rest exponential."
    )
    bright_star_density_per_deg2: float = Field(
        default=60.0, ge=0, description="Saturating stars (a few per LSSTCam CCD)."
    )
    bright_star_mag_range: tuple[float, float] = (10.0, 13.0)
    streaks_per_exposure: float = Field(
        default=0.3, ge=0, description="Mean number of satellite/aircraft trails per snap."
    )
    n_streaks: int | None = Field(
        default=None, ge=0, description="Exactly this many trails per snap (tests); None: random."
    )
    streak_flux_e_per_px: tuple[float, float] = Field(
        default=(50.0, 1.0e6), description="Electrons per pixel of trail length (log-uniform)."
    )
    streak_segment_fraction: float = Field(
        default=0.3, ge=0, le=1, description="Trails that end on the detector instead of crossing."
    )
    streak_defocus_sigma_px: tuple[float, float] = Field(
        default=(0.0, 3.0), description="Extra Gaussian blur across a trail (out-of-focus)."
    )
    bleed: bool = Field(default=True, description="Charge above full well bleeds along columns.")

    @model_validator(mode="after")
    def _ranges(self) -> RealisticSkyConfig:
        for name in (
            "template_fwhm_arcsec",
            "blend_separation_fwhm",
            "blend_delta_mag",
            "galaxy_mag_range",
            "galaxy_hlr_arcsec",
            "bright_star_mag_range",
            "streak_flux_e_per_px",
            "streak_defocus_sigma_px",
        ):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high), not {(lo, hi)}")
        if (
            min(*self.template_fwhm_arcsec, *self.galaxy_hlr_arcsec, *self.streak_flux_e_per_px)
            <= 0
        ):
            raise ValueError("FWHM, half-light radii and trail fluxes must be > 0")
        if min(*self.blend_separation_fwhm, *self.streak_defocus_sigma_px) < 0:
            raise ValueError("separations and blurs must be >= 0")
        return self


class SimConfig(_Frozen):
    """The built-in simulator (``ppray demo`` / ``ppray simulate``)."""

    sky: Literal["simple", "realistic"] = Field(
        default="simple",
        description="simple: round Gaussian stars; realistic: varying elliptical PSFs with "
        "wings, blends, galaxies, trails, bleeding bright stars (docs/simulator.md).",
    )
    realistic: RealisticSkyConfig = RealisticSkyConfig()

    n_visits: int = Field(default=3, ge=1)
    exposure_time_s: float = Field(default=30.0, gt=0)
    time_scale: float = Field(
        default=0.02, gt=0, description="Simulated seconds -> wall seconds (0.02: 30 s in 0.6 s)."
    )
    visit_interval_s: float = Field(default=35.0, gt=0)
    lead_time_s: float = Field(default=20.0, ge=0, description="next_visit ahead of the shutter.")
    nimages: int = Field(default=1, ge=1)
    seeing_fwhm_arcsec: tuple[float, float] = (0.7, 1.1)
    sky_e_per_px_per_s: float = Field(default=30.0, ge=0)
    star_density_per_deg2: float = Field(default=60000.0, ge=0)
    field_ra_deg: float = 150.0
    field_dec_deg: float = 2.2
    dither_arcsec: float = Field(default=10.0, ge=0)
    pointing_error_arcsec: float = Field(default=1.0, ge=0)
    catalog_radius_deg: float | None = Field(
        default=None, gt=0, description="Sky radius to simulate; None: the whole camera."
    )
    cosmic_rays_per_detector: int = Field(default=10, ge=0)
    n_new_transients: int = Field(default=12, ge=0, description="Over the whole field.")
    n_variables: int = Field(default=12, ge=0)
    n_movers: int = Field(default=4, ge=0)
    transient_mag_range: tuple[float, float] = Field(
        default=(18.0, 22.0),
        description="AB magnitudes of new and moving objects and of variables' base (uniform).",
    )
    seed: int = 0


class ApdbConfig(_Frozen):
    """The Alert Production Database: sky shards, association, history."""

    enabled: bool = Field(default=True, description="False: DIA sources only, no alerts.")
    backend: Literal["rubin", "parquet"] = Field(
        default="rubin",
        description="rubin: Rubin's APDB through lsst.dax.apdb (SQLite, PostgreSQL, "
        "Cassandra); parquet: ppray's own HEALPix-partitioned Parquet files.",
    )
    db_url: str | None = Field(
        default=None,
        description="rubin: SQL APDB to use, made if absent (sqlite:///..., postgresql://...); "
        "default a SQLite file output_root/apdb/apdb.sqlite3.",
    )
    db_password: SecretStr | None = Field(
        default=None,
        description="rubin: the SQL APDB's password, from PPRAY_APDB__DB_PASSWORD (never "
        "in a file); the driver's own PGPASSWORD works too.",
    )
    config_uri: str | None = Field(
        default=None,
        description="rubin: an existing APDB's config file (apdb-cli create-sql or "
        "create-cassandra), as Rubin's Prompt Processing is given; wins over db_url.",
    )
    connection_timeout_s: float = Field(
        default=60.0, gt=0, description="rubin: how long a store waits for a locked database."
    )
    n_shards: int = Field(default=2, ge=1, description="Sky-shard actors (HEALPix % n).")
    shard_nside: int = Field(default=8, ge=1, description="HEALPix nside of the shard cells.")
    partition_nside: int = Field(
        default=32, ge=1, description="parquet: HEALPix nside of the Parquet files."
    )
    radius_arcsec: float = Field(default=1.0, gt=0, lt=3600)
    history_days: float = Field(default=365.0, ge=0)
    preload_padding_deg: float = Field(default=0.01, ge=0)

    @field_validator("db_password", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # Environment overrides are YAML-parsed: a numeric password arrives as an int.
        return value if value is None or isinstance(value, SecretStr) else str(value)


Pipeline = Literal["ap", "single_frame", "isr", "skip"]
"""What a visit gets: ``ap`` everything up to alerts; ``single_frame`` ISR, sources,
astrometry and photometry (no template, no DIA, no alerts); ``isr`` the calibrated
exposure only; ``skip`` nothing."""


class PipelineRule(_Frozen):
    """One rule: visits of matching surveys (and sky region) get ``pipeline``."""

    survey: str = Field(
        default="*", description="fnmatch pattern on next_visit's survey, e.g. 'BLOCK-*'."
    )
    region: tuple[float, float, float] | None = Field(
        default=None, description="(ra, dec, radius) in degrees: only visits pointed inside."
    )
    pipeline: Pipeline

    @model_validator(mode="after")
    def _region_sane(self) -> PipelineRule:
        if self.region is not None:
            _ra, dec, radius = self.region
            if not (-90.0 <= dec <= 90.0 and 0.0 < radius <= 180.0):
                raise ValueError(f"region (ra, dec, radius) {self.region}: need |dec| <= 90 "
                                 "and 0 < radius <= 180")  # fmt: skip
        return self


class PipelinesConfig(_Frozen):
    """Which steps each visit gets, chosen per instrument by ordered rules (first match)."""

    rules: dict[str, tuple[PipelineRule, ...]] = Field(
        default_factory=dict, description="Instrument name -> rules, first match wins."
    )
    default: Pipeline = Field(default="ap", description="When no rule matches.")
    max_rotation_offset_deg: float = Field(
        default=1.0,
        gt=0,
        description="A raw whose rotation (ROTPA) is further than this from its next_visit's "
        "cameraAngle is flagged (rotation_mismatch), as Rubin discards such visits.",
    )


class S3Config(_Frozen):
    """The object store behind ``s3://`` roots (raws, outputs, calibrations).

    Unset fields fall back to the AWS SDK's own (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``, instance
    or pod identity): credentials need not be in any file.
    """

    endpoint_url: str | None = Field(
        default=None,
        description="http(s)://host:port of an S3-compatible server (Ceph, MinIO, SeaweedFS); "
        "None: AWS.",
    )
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = Field(
        default=None, description="From PPRAY_S3__SECRET_ACCESS_KEY; never logged."
    )
    retries: int = Field(
        default=4, ge=0, description="Retries of a transient S3 error (throttled, 5xx, network)."
    )
    retry_backoff_s: float = Field(
        default=0.25, gt=0, description="First backoff; doubled each retry."
    )

    @field_validator("secret_access_key", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return value if value is None or isinstance(value, SecretStr) else str(value)

    def configure(self) -> None:
        """Reach ``s3://`` roots this way in this process (:func:`ppray.storage.configure_s3`)."""
        from ppray.storage import S3Options, configure_s3

        secret = self.secret_access_key
        configure_s3(
            S3Options(
                endpoint_url=self.endpoint_url,
                region=self.region,
                access_key_id=self.access_key_id,
                secret_access_key=None if secret is None else secret.get_secret_value(),
                retries=self.retries,
                retry_backoff_s=self.retry_backoff_s,
            )
        )


class AlertConfig(_Frozen):
    """Alert packets (lsst-alert-packet schema 11.1) and where they go; on Kafka in
    Rubin's framing by default."""

    sink: Literal["file", "kafka", "none"] = Field(
        default="file",
        description="file: Avro container per visit and detector; kafka: one message per alert.",
    )
    cutout_size_px: int = Field(default=30, ge=4)
    confluent_wire_format: bool = Field(
        default=True,
        description="Kafka messages in the Confluent wire format, as Rubin's producer writes "
        "them: magic byte 0, the schema's registry id (1101 for 11.1), the Avro alert.",
    )
    kafka_key: Literal["none", "diaSourceId"] = Field(
        default="none",
        description="Kafka message key: none (as Rubin) or the diaSourceId in decimal ASCII.",
    )
    min_reliability: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Alerts only for DIA sources this reliable (Rubin runs 0.5); the others "
        "are still associated and written to the APDB with their score.",
    )


class CalibSurveys(_Frozen):
    """The ``next_visit`` ``survey`` that announces each kind of calibration sequence."""

    bias: str = Field(default="CALIB-BIAS", min_length=1)
    dark: str = Field(default="CALIB-DARK", min_length=1)
    flat: str = Field(default="CALIB-FLAT", min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> CalibSurveys:
        names = [self.bias, self.dark, self.flat]
        if len(set(names)) != len(names):
            raise ValueError(f"calibration surveys must differ, got {names}")
        return self

    def kind_of(self, survey: str) -> Literal["bias", "dark", "flat"] | None:
        """The kind of sequence ``survey`` announces, or None for any other survey."""
        for kind in ("bias", "dark", "flat"):
            if getattr(self, kind) == survey:
                return kind
        return None


class CombineOptions(_Frozen):
    """How a detector combines its calibration exposures (``StreamingCombiner``)."""

    method: Literal["clipped_mean", "mean"] = Field(
        default="clipped_mean", description="mean: no outlier rejection."
    )
    nsigma: float = Field(default=4.0, gt=0, description="Clipping threshold, in sigma.")
    n_reference: int = Field(
        default=5, ge=1, description="Inputs held for the reference median (memory: this many)."
    )
    grow: int = Field(
        default=1, ge=0, description="Also reject pixels this close to a clipped one."
    )


class DefectOptions(_Frozen):
    """Thresholds of defect finding (``ppray.calib.defects.find_defects``)."""

    hot_nsigma: float = Field(default=5.0, gt=0)
    hot_min_e_per_s: float = Field(default=0.0, ge=0)
    cold_threshold: float = Field(default=0.8, gt=0, le=1)
    dead_threshold: float = Field(default=0.1, ge=0, le=1)
    column_nsigma: float = Field(default=5.0, gt=0)


class CalibrationConfig(_Frozen):
    """Calibration sequences: recognised by survey, combined per detector, then certified."""

    surveys: CalibSurveys = CalibSurveys()
    validity_days: float | None = Field(
        default=None,
        gt=0,
        description="Certified products are valid from the sequence's startTime for this "
        "long; None: open-ended (until a newer certification supersedes them).",
    )
    combine: CombineOptions = CombineOptions()
    defects: DefectOptions = DefectOptions()
    find_defects: bool = Field(
        default=True, description="After a flat sequence, also certify defects (dark + flat)."
    )
    flat_quantiles: int = Field(
        default=257, ge=2, description="Quantiles per detector for the focal-plane median."
    )


class DeploymentConfig(_Frozen):
    """Everything a ppray deployment needs to know."""

    instrument: str = "synthetic"
    detectors: tuple[str, ...] | None = Field(
        default=None, description="Detectors to run; None: all of the instrument's."
    )
    output_root: str = "ppray-output/out"
    raw_root: str = "ppray-output/raw"
    calib_root: str = "ppray-output/calib"
    refcat_root: str = Field(
        default="ppray-output/calib", description="Root holding refcat/ shards."
    )
    refcat_padding_deg: float = Field(default=0.01, ge=0)
    template_root: str = Field(
        default="ppray-output/calib", description="Root holding templates/ patches."
    )
    template_patch_deg: float = Field(
        default=0.2, gt=0, description="Side of a template patch (the sky tiling)."
    )
    template_padding_deg: float = Field(default=0.005, ge=0)
    image_timeout_s: float = Field(default=20.0, gt=0)
    raw_buffer_ttl_s: float = Field(
        default=300.0, gt=0, description="How long a raw waits for its next_visit."
    )
    remembered_visits: int = Field(default=1000, ge=1, description="Done visits kept for dedup.")
    max_visits_in_flight: int = Field(
        default=4, ge=1, description="Visits prepared at once; later ones queue (backpressure)."
    )
    max_visit_backlog: int = Field(
        default=50, ge=1, description="Queued visits at most; the source is not read beyond."
    )
    detector_retries: int = Field(
        default=1, ge=0, le=3, description="Re-runs of a detector whose worker died mid-visit."
    )
    write_images: bool = True
    source: SourceConfig = SourceConfig()
    detection: DetectionConfig = DetectionConfig()
    apdb: ApdbConfig = ApdbConfig()
    s3: S3Config = S3Config()
    pipelines: PipelinesConfig = PipelinesConfig()
    alerts: AlertConfig = AlertConfig()
    sim: SimConfig = SimConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    kafka: KafkaConfig | None = Field(
        default=None, description="Broker, topics, security; needed by the kafka source/sink."
    )
    # Detector workers are spread over the nodes, so that losing one node loses few.
    worker: ActorOptions = ActorOptions(scheduling_strategy="SPREAD")
    coordinator: ActorOptions = ActorOptions(max_concurrency=1000)
    # One call at a time per shard: that is what keeps association consistent.
    apdb_shard: ActorOptions = ActorOptions(max_concurrency=1)
    aggregator: ActorOptions = ActorOptions(max_concurrency=1000)
    ray_address: str = Field(
        default="local", description="'local' starts Ray in-process; 'auto' or an address joins."
    )
    ray_num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "ppray"

    @model_validator(mode="after")
    def _kafka_configured(self) -> DeploymentConfig:
        if self.kafka is None and "kafka" in (self.source.kind, self.alerts.sink):
            raise ValueError("source.kind or alerts.sink 'kafka' needs a kafka: section")
        if self.worker.max_task_retries != 0:
            # Ray would re-run ``result`` on the restarted worker, which has lost the
            # visit's preload and raws: it would wait out the timeout instead.
            raise ValueError(
                "worker.max_task_retries must be 0: the coordinator re-runs the detector of "
                "a worker that died (detector_retries), re-sending its prepare and raws"
            )
        return self

    def rooted_at(self, root: str) -> DeploymentConfig:
        """A copy with every storage root under ``root`` (``out/``, ``raw/``, ``calib/``)."""
        root = root.rstrip("/")
        return self.with_overrides(
            output_root=f"{root}/out",
            raw_root=f"{root}/raw",
            calib_root=f"{root}/calib",
            refcat_root=f"{root}/calib",
            template_root=f"{root}/calib",
        )

    def with_overrides(self, **changes: Any) -> DeploymentConfig:
        """A copy with fields replaced, validated."""
        return DeploymentConfig.model_validate({**self.model_dump(), **changes})


def default_config_path() -> Path:
    """The embedded default deployment (local Ray, simulator, in-memory messaging)."""
    return Path(str(resources.files("ppray._configs"))) / "deployments" / "local.yaml"


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    fields = DeploymentConfig.model_fields
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith("PPRAY_"):
            continue
        path = name[len("PPRAY_") :].lower().split("__")
        if path[0] not in fields:
            continue
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        # YAML parsing turns "1" into 1, "true" into True and "[a, b]" into a list.
        target[path[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> DeploymentConfig:
    """Load a deployment config from YAML, then apply ``PPRAY_*`` environment overrides.

    Parameters
    ----------
    path
        YAML file; None for the embedded default.
    env
        Environment to read overrides from; None for ``os.environ``.

    Raises
    ------
    ValueError
        Naming the file and the offending field when the config is invalid.
    """
    cfg_path = Path(path) if path is not None else default_config_path()
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ValueError(f"config file {cfg_path} does not exist") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"config file {cfg_path}: expected a mapping at the top level")
    merged = _merge(raw, _env_overrides(os.environ if env is None else env))
    try:
        return DeploymentConfig.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"config {cfg_path}: field {field!r}: {first['msg']}") from exc
