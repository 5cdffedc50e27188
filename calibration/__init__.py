"""Calibration: text samples in (data), sensitivity and the switching policy out."""
