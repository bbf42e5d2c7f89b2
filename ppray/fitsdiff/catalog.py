"""A user's reference catalogue (Parquet, CSV or FITS) as the table ``calibrate`` wants."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ppray.fitsdiff.headers import FitsInputError

__all__ = ["read_reference_catalog"]

_PARQUET = (".parquet", ".pq")
_FITS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_CSV = (".csv", ".csv.gz", ".txt", ".tsv")


def _read(path: Path) -> pa.Table:
    name = path.name.lower()
    try:
        if name.endswith(_PARQUET):
            return pq.read_table(path)
        if name.endswith(_FITS):
            from astropy.table import Table
            from astropy.units import UnitsWarning

            with warnings.catch_warnings():
                # Catalogues' unit strings are often not FITS-standard; units are not used.
                warnings.simplefilter("ignore", UnitsWarning)
                table = Table.read(path, format="fits")
            return pa.table(
                {name: np.asarray(table[name]) for name in table.colnames if table[name].ndim == 1}
            )
        if name.endswith(_CSV):
            delimiter = "\t" if name.endswith(".tsv") else ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise FitsInputError(f"{path.name}: unreadable reference catalogue: {exc}") from exc
    raise FitsInputError(
        f"{path.name}: unknown catalogue format (Parquet .parquet, CSV .csv/.tsv or FITS .fits)"
    )


def _column(table: pa.Table, wanted: str, path: Path, option: str) -> np.ndarray:
    names = {n.lower(): n for n in table.column_names}
    if wanted.lower() not in names:
        raise FitsInputError(
            f"{path.name}: no column {wanted!r} (columns: {', '.join(table.column_names)}); "
            f"pass {option} NAME"
        )
    column = table[names[wanted.lower()]]
    try:
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise FitsInputError(f"{path.name}: column {wanted!r} is not numeric: {exc}") from exc


def read_reference_catalog(
    path: str | Path, *, ra: str = "ra", dec: str = "dec", mag: str = "mag"
) -> pa.Table:
    """Read a reference catalogue for astrometric and photometric calibration.

    Parameters
    ----------
    path
        Parquet (``.parquet``), CSV (``.csv``, ``.tsv``) or FITS table (``.fits``).
    ra, dec
        Column names (case-insensitive) of the positions, degrees (ICRS).
    mag
        Column name of the magnitudes in the images' band (AB for an AB zero point).

    Returns
    -------
    pyarrow.Table
        ``id`` (the row number), ``ra``, ``dec``, ``mag``: the columns
        :func:`ppray.visit.steps.calibrate` reads; rows with a non-finite value dropped.

    Raises
    ------
    FitsInputError
        For a missing or unreadable file, a missing or non-numeric column, or no
        usable row.
    """
    path = Path(path)
    if not path.is_file():
        raise FitsInputError(f"{path}: no such reference catalogue")
    table = _read(path)
    ra_deg = _column(table, ra, path, "--refcat-ra")
    dec_deg = _column(table, dec, path, "--refcat-dec")
    mags = _column(table, mag, path, "--refcat-mag")
    good = np.isfinite(ra_deg) & np.isfinite(dec_deg) & np.isfinite(mags)
    good &= np.abs(dec_deg) <= 90.0
    if not good.any():
        raise FitsInputError(f"{path.name}: no row with finite {ra}, {dec} and {mag}")
    return pa.table(
        {
            "id": pa.array(np.flatnonzero(good).astype(np.int64)),
            "ra": pa.array(ra_deg[good] % 360.0),
            "dec": pa.array(dec_deg[good]),
            "mag": pa.array(mags[good]),
        }
    )
