"""INT8 / INT4: calibration data, activation ranges, and the quantization of the exported graphs."""
