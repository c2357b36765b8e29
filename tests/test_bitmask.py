"""APOGEE_PIXMASK names, default honoured bits, and masking in the reader."""

import numpy as np
import pytest

from astra_cannon.io import bitmask, read_apstar


def test_bit_names_follow_the_public_definition():
    assert bitmask.PIXMASK_BITS["BADPIX"] == 0
    assert bitmask.PIXMASK_BITS["SIG_SKYLINE"] == 12
    assert bitmask.PIXMASK_BITS["SIG_TELLURIC"] == 13
    assert bitmask.PIXMASK_BITS["NOT_ENOUGH_PSF"] == 14
    assert bitmask.decode_pixmask((1 << 1) | (1 << 9)) == ["CRPIX", "PERSIST_HIGH"]


def test_default_set_honours_hard_failures_but_not_warnings():
    default = bitmask.decode_pixmask(bitmask.DEFAULT_PIXMASK)
    assert {"BADPIX", "CRPIX", "SATPIX", "SIG_SKYLINE"} <= set(default)
    assert not {"SIG_TELLURIC", "PERSIST_LOW", "PERSIST_MED", "LITTROW_GHOST"} & set(default)


def test_pixmask_value_is_case_insensitive_and_rejects_unknown_names():
    assert bitmask.pixmask_value(["badpix", "CRPIX"]) == 3
    with pytest.raises(ValueError, match="NOPE"):
        bitmask.pixmask_value(["NOPE"])
    assert bitmask.resolve_pixmask(0) == 0
    assert bitmask.resolve_pixmask(None) == bitmask.DEFAULT_PIXMASK


def test_bad_pixels_works_on_big_endian_integer_arrays():
    bits = np.array([0, 1, 1 << 13, 1 << 12], dtype=">i8")
    np.testing.assert_array_equal(bitmask.bad_pixels(bits), [False, True, False, True])
    np.testing.assert_array_equal(bitmask.bad_pixels(bits, ["SIG_TELLURIC"]), [False, False, True, False])


def test_reader_gives_masked_pixels_zero_ivar_and_honours_configuration(apstar_file):
    path, arrays = apstar_file
    default = read_apstar(path)
    assert default.ivar[0, 1000] == 0          # BADPIX
    assert default.ivar[0, 1001] > 0           # SIG_TELLURIC, not honoured by default
    custom = read_apstar(path, pixmask=["SIG_TELLURIC"])
    assert custom.ivar[0, 1000] > 0 and custom.ivar[0, 1001] == 0
    none = read_apstar(path, pixmask=0)
    assert none.ivar[0, 1000] > 0 and none.ivar[0, 1001] > 0
