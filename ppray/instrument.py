"""Instruments and camera geometry, loaded from ``configs/instruments/*.yaml``.

Coordinates
-----------
Focal-plane positions are in millimetres from the boresight, +x along the
detector's serial (column) direction and +y along its parallel (row)
direction when ``cameraAngle`` is 0. A detector's WCS is a TAN projection about
the boresight (see :func:`detector_wcs`), so its sky footprint follows from
boresight, rotation and its focal-plane position.

Raw layout
----------
Each amplifier is read out as its own FITS HDU of ``prescan + nx_amp +
overscan`` columns by ``ny_amp + parallel_overscan`` rows; the data section is
``[prescan : prescan + nx_amp, 0 : ny_amp]`` in numpy order ``[y, x]``.
Amplifiers are laid out on an ``amps_x`` by ``amps_y`` grid. (Real LSST raws
flip half the amplifiers' readout direction; we store them already in
detector orientation, and say so in the header, to keep the simulator simple.)
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from astropy.wcs import WCS
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AmplifierGeometry",
    "Detector",
    "DetectorLayout",
    "Instrument",
    "detector_wcs",
    "list_instruments",
    "load_instrument",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AmplifierGeometry(_Frozen):
    """One amplifier's place in the assembled detector and its electronics."""

    name: str
    index: int
    x0: int = Field(description="First assembled column of this amplifier's data.")
    y0: int = Field(description="First assembled row of this amplifier's data.")
    nx: int
    ny: int
    gain_e_per_adu: float
    read_noise_e: float
    bias_level_adu: float
    saturation_adu: float

    @property
    def slices(self) -> tuple[slice, slice]:
        """Numpy ``[y, x]`` slices of this amplifier in the assembled image."""
        return slice(self.y0, self.y0 + self.ny), slice(self.x0, self.x0 + self.nx)


class DetectorLayout(_Frozen):
    """The shape of every detector of an instrument and of its raw amplifier segments."""

    nx: int = Field(gt=0)
    ny: int = Field(gt=0)
    amps_x: int = Field(gt=0)
    amps_y: int = Field(gt=0)
    serial_prescan: int = Field(ge=0)
    serial_overscan: int = Field(gt=0)
    parallel_overscan: int = Field(ge=0)
    gain_e_per_adu: float = Field(gt=0)
    read_noise_e: float = Field(ge=0)
    bias_level_adu: float
    saturation_adu: float = Field(gt=0)
    dark_current_e_per_s: float = Field(default=0.002, ge=0)

    @model_validator(mode="after")
    def _amps_divide(self) -> DetectorLayout:
        if self.nx % self.amps_x or self.ny % self.amps_y:
            raise ValueError(
                f"detector {self.nx}x{self.ny} does not divide into "
                f"{self.amps_x}x{self.amps_y} amps"
            )
        return self

    @property
    def amp_nx(self) -> int:
        return self.nx // self.amps_x

    @property
    def amp_ny(self) -> int:
        return self.ny // self.amps_y

    @property
    def raw_amp_shape(self) -> tuple[int, int]:
        """Numpy shape ``(rows, cols)`` of one amplifier's raw segment."""
        return (
            self.amp_ny + self.parallel_overscan,
            self.serial_prescan + self.amp_nx + self.serial_overscan,
        )


class Detector(_Frozen):
    """One science detector: its name, id and place on the focal plane."""

    id: int = Field(ge=0)
    name: str
    fp_x_mm: float
    fp_y_mm: float
    amplifiers: tuple[AmplifierGeometry, ...]

    @property
    def raft(self) -> str:
        return self.name.split("_")[0]

    @property
    def sensor(self) -> str:
        return self.name.split("_")[-1]


class Instrument(_Frozen):
    """An instrument: its detectors, their layout, pixel scale and filters."""

    name: str
    short_name: str
    obs_id_prefix: str = Field(description="Prefix of OBS_ID, e.g. 'MC_O' for LSSTCam.")
    pixel_size_um: float = Field(gt=0)
    pixel_scale_arcsec: float = Field(gt=0)
    filters: tuple[str, ...]
    layout: DetectorLayout
    detectors: tuple[Detector, ...]

    @model_validator(mode="after")
    def _unique(self) -> Instrument:
        names = [d.name for d in self.detectors]
        ids = [d.id for d in self.detectors]
        if len(set(names)) != len(names) or len(set(ids)) != len(ids):
            raise ValueError(f"instrument {self.name}: detector names and ids must be unique")
        return self

    def detector(self, key: str | int) -> Detector:
        """Look a detector up by name (``"R22_S11"``) or id.

        Raises
        ------
        KeyError
            With the instrument name, for a detector this instrument does not have.
        """
        for det in self.detectors:
            if det.name == key or det.id == key:
                return det
        raise KeyError(f"{self.name} has no detector {key!r}")

    def has_detector(self, key: str | int) -> bool:
        return any(d.name == key or d.id == key for d in self.detectors)

    @property
    def mm_to_px(self) -> float:
        return 1000.0 / self.pixel_size_um

    @property
    def detector_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    def field_radius_deg(self) -> float:
        """Radius of a circle about the boresight that holds every detector."""
        half_diag_mm = 0.5 * math.hypot(self.layout.nx, self.layout.ny) / self.mm_to_px
        r_mm = max(math.hypot(d.fp_x_mm, d.fp_y_mm) for d in self.detectors) + half_diag_mm
        return r_mm * self.mm_to_px * self.pixel_scale_arcsec / 3600.0


def _amplifiers(layout: DetectorLayout) -> tuple[AmplifierGeometry, ...]:
    amps = []
    for iy in range(layout.amps_y):
        for ix in range(layout.amps_x):
            index = iy * layout.amps_x + ix
            amps.append(
                AmplifierGeometry(
                    name=f"C{iy}{ix}",
                    index=index,
                    x0=ix * layout.amp_nx,
                    y0=iy * layout.amp_ny,
                    nx=layout.amp_nx,
                    ny=layout.amp_ny,
                    gain_e_per_adu=layout.gain_e_per_adu,
                    read_noise_e=layout.read_noise_e,
                    bias_level_adu=layout.bias_level_adu,
                    saturation_adu=layout.saturation_adu,
                )
            )
    return tuple(amps)


def _expand_detectors(spec: dict[str, Any], layout: DetectorLayout) -> list[Detector]:
    """Expand a raft-grid description, or take an explicit detector list."""
    amps = _amplifiers(layout)
    if "detectors" in spec:
        return [Detector(**d, amplifiers=amps) for d in spec["detectors"]]
    grid = spec["raft_grid"]
    raft_pitch = float(grid["raft_pitch_mm"])
    sensor_pitch = float(grid["sensor_pitch_mm"])
    center = int(grid.get("center", 2))
    detectors = []
    next_id = 0
    # Rubin numbering: rafts in listed order, sensors S00..S22 within each raft.
    for raft in grid["rafts"]:
        ry, rx = int(raft[1]), int(raft[2])
        for sensor in grid["sensors"]:
            sy, sx = int(sensor[1]), int(sensor[2])
            detectors.append(
                Detector(
                    id=next_id,
                    name=f"{raft}_{sensor}",
                    fp_x_mm=(rx - center) * raft_pitch + (sx - 1) * sensor_pitch,
                    fp_y_mm=(ry - center) * raft_pitch + (sy - 1) * sensor_pitch,
                    amplifiers=amps,
                )
            )
            next_id += 1
    return detectors


def _config_root() -> Path:
    return Path(str(resources.files("ppray._configs")))


def list_instruments() -> list[str]:
    """Names of the instruments shipped in ``configs/instruments``."""
    return sorted(p.stem for p in (_config_root() / "instruments").glob("*.yaml"))


@cache
def load_instrument(name_or_path: str) -> Instrument:
    """Load an instrument by short name (``"lsstcam"``) or from a YAML path.

    Raises
    ------
    ValueError
        For an unknown instrument name, listing the known ones.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = _config_root() / "instruments" / f"{name_or_path.lower()}.yaml"
        if not path.exists():
            raise ValueError(
                f"unknown instrument {name_or_path!r}; known: {', '.join(list_instruments())}"
            )
    spec = yaml.safe_load(path.read_text())
    layout = DetectorLayout(**spec["layout"])
    return Instrument(
        name=spec["name"],
        short_name=spec.get("short_name", spec["name"]),
        obs_id_prefix=spec["obs_id_prefix"],
        pixel_size_um=spec["pixel_size_um"],
        pixel_scale_arcsec=spec["pixel_scale_arcsec"],
        filters=tuple(spec["filters"]),
        layout=layout,
        detectors=tuple(_expand_detectors(spec, layout)),
    )


def detector_wcs(
    instrument: Instrument,
    detector: Detector,
    ra_deg: float,
    dec_deg: float,
    rotation_deg: float,
) -> WCS:
    """The nominal TAN WCS of a detector for a boresight and camera rotation.

    Parameters
    ----------
    instrument, detector
        The camera and one of its detectors.
    ra_deg, dec_deg
        Boresight (ICRS, degrees).
    rotation_deg
        Camera angle on the sky (degrees, east of north), as ``cameraAngle``.

    Returns
    -------
    astropy.wcs.WCS
        Pixel (0-based numpy ``x, y``) to sky; east is left when rotation is 0.
    """
    layout = instrument.layout
    scale = instrument.pixel_scale_arcsec / 3600.0
    theta = math.radians(rotation_deg)
    c, s = math.cos(theta), math.sin(theta)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    # The boresight sits at focal-plane (0, 0); FITS pixels are 1-based.
    wcs.wcs.crpix = [
        (layout.nx + 1) / 2.0 - detector.fp_x_mm * instrument.mm_to_px,
        (layout.ny + 1) / 2.0 - detector.fp_y_mm * instrument.mm_to_px,
    ]
    wcs.wcs.cd = np.array([[-scale * c, scale * s], [scale * s, scale * c]])
    wcs.wcs.set()
    return wcs
