"""precision: TensorRT's calibration cache header per version and method."""

from __future__ import annotations

import pytest

from autoglm_build.precision import read_trt_cache, trt_cache_header, trt_version_number, write_trt_cache


@pytest.mark.parametrize("version, number", [
    ("8.5.3", 8503), ("8.6.1", 8601), ("9.3.0", 9300),  # major*1000 + minor*100 + patch below 10
    ("10.0.1", 100001), ("10.3.0", 100300), ("10.13", 101300),  # major*10000 + ... from 10.0
])
def test_version_number_is_nv_tensorrt_version(version, number):
    assert trt_version_number(version) == number


@pytest.mark.parametrize("version, method, header", [
    ("8.5.3", "entropy", "TRT-8503-EntropyCalibration2"),
    ("8.5.3", "minmax", "TRT-8503-MinMaxCalibration"),
    ("8.5.3", "percentile", "TRT-8503-LegacyCalibration"),
    ("10.3.0", "entropy", "TRT-100300-EntropyCalibration2"),
    ("10.3.0", "minmax", "TRT-100300-MinMaxCalibration"),
    ("10.13.0", "percentile", "TRT-101300-LegacyCalibration"),
])
def test_cache_header_per_version_and_method(version, method, header):
    assert trt_cache_header(version, method) == header


def test_no_cache_header_for_tensorrt_11():
    with pytest.raises(ValueError, match="TensorRT <= 10"):
        trt_cache_header("11.1.0", "entropy")


def test_cache_round_trips(tmp_path):
    path = tmp_path / "m.calib.cache"
    written = write_trt_cache(path, {"x": (-2.54, 1.0), "zero": (0.0, 0.0)}, trt_cache_header("10.3.0", "minmax"))
    header, scales = read_trt_cache(path)
    assert written == 1 and header == "TRT-100300-MinMaxCalibration"
    assert scales == {"x": pytest.approx(2.54 / 127)}
