"""The container every reader returns: a batch of spectra on one wavelength grid.

A reader never raises for one bad file: the spectrum gets a flag bit from
:mod:`astra_cannon.flags` and a human-readable reason, its flux is NaN and its ivar 0, and the
rest of the batch goes on. Exceptions are kept for broken configuration (unknown format,
no paths at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _joint_normalised(batches):
    """Whether a joined batch is normalised, judged only by batches with a readable spectrum.

    An unreadable file yields a placeholder spectrum that is neither normalised nor not; it
    must not make its readable neighbours look un-normalised (they would be re-normalised).
    """
    from ..flags import UNREADABLE_INPUT

    readable = [b for b in batches if len(b) and not np.all(b.flags & UNREADABLE_INPUT)]
    return all(b.normalised for b in readable) if readable else False


@dataclass
class Spectra:
    """A batch of spectra sharing one wavelength grid.

    Parameters
    ----------
    identifiers : list of str
        One identifier per spectrum (e.g. ``"apStar-dr17-2M19485057+5005279.fits[0]"``).
    flux : ndarray, shape (S, P)
        Native-endian float64 flux (normalised or not, see ``normalised``).
    ivar : ndarray, shape (S, P)
        Native-endian float64 inverse variance; 0 where a pixel is masked or unusable.
    wavelength : ndarray, shape (P,)
        Vacuum wavelength in Angstrom.
    flags : ndarray of int64, shape (S,)
        Bits from :mod:`astra_cannon.flags`; non-zero failure bits mean "do not fit".
    reasons : list of (str or None)
        Why a spectrum is flagged, ``None`` when it is fine.
    sources : list of dict
        Where each spectrum came from: ``{"path", "hdu", "row", "checksum"}`` (JSON-safe).
    normalised : bool
        True when the flux is continuum-normalised.
    meta : list of dict
        Per-spectrum extras from the file header (S/N, object name, ...), JSON-safe.
    """

    identifiers: list
    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    flags: np.ndarray = None
    reasons: list = None
    sources: list = None
    normalised: bool = False
    meta: list = field(default=None)

    def __post_init__(self):
        self.flux = np.atleast_2d(np.asarray(self.flux, dtype=np.float64))
        self.ivar = np.atleast_2d(np.asarray(self.ivar, dtype=np.float64))
        self.wavelength = np.asarray(self.wavelength, dtype=np.float64)
        n = self.flux.shape[0]
        if self.ivar.shape != self.flux.shape:
            raise ValueError(f"flux {self.flux.shape} and ivar {self.ivar.shape} differ in shape")
        if len(self.identifiers) != n:
            raise ValueError(f"{len(self.identifiers)} identifiers for {n} spectra")
        if self.flags is None:
            self.flags = np.zeros(n, dtype=np.int64)
        self.flags = np.asarray(self.flags, dtype=np.int64)
        if self.reasons is None:
            self.reasons = [None] * n
        if self.sources is None:
            self.sources = [{} for _ in range(n)]
        if self.meta is None:
            self.meta = [{} for _ in range(n)]

    def __len__(self) -> int:
        return self.flux.shape[0]

    @classmethod
    def concatenate(cls, batches):
        """Join batches that share one wavelength grid into one."""
        batches = list(batches)
        if not batches:
            raise ValueError("no batches to concatenate")
        wl = batches[0].wavelength
        for b in batches[1:]:
            if b.wavelength.shape != wl.shape or not np.allclose(b.wavelength, wl, rtol=0, atol=1e-6):
                raise ValueError("cannot concatenate spectra on different wavelength grids")
        return cls(
            identifiers=sum((list(b.identifiers) for b in batches), []),
            flux=np.vstack([b.flux for b in batches]),
            ivar=np.vstack([b.ivar for b in batches]),
            wavelength=wl,
            flags=np.concatenate([b.flags for b in batches]),
            reasons=sum((list(b.reasons) for b in batches), []),
            sources=sum((list(b.sources) for b in batches), []),
            normalised=_joint_normalised(batches),
            meta=sum((list(b.meta) for b in batches), []),
        )
