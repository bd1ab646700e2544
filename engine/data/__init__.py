"""Datasets for the engine: synthetic patients, the paper's HDF5 layout, DICOM folders."""

from engine.data.synthetic import CLASSES, Batch, SyntheticPatients

__all__ = ["CLASSES", "Batch", "SyntheticPatients"]
