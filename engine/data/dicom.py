"""Synthetic patients as DICOM DX studies with realistic, PHI-laden synthetic headers.

Every name, ID, date and institution here is invented from a seed; none belongs to a
person. One study per visit, one image per study. A ``labels.csv`` beside the files
records file, patient_id and label (the ground truth, never written into headers).
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np

from engine.data.synthetic import CLASSES, SyntheticPatients

GIVEN = ["Avery", "Jordan", "Morgan", "Riley", "Casey", "Quinn", "Harper", "Rowan", "Emerson", "Finley", "Sage", "Elliot"]
FAMILY = ["Marlowe", "Okafor", "Lindqvist", "Castellano", "Nakamura", "Brennan", "Devereux", "Halvorsen", "Achebe", "Moreau"]
INSTITUTIONS = ["Northfield General Hospital", "Saint Synthetic Medical Center", "Riverbend Clinic"]
PHYSICIANS = ["Vance^Oriel", "Pryce^Talia", "Mercer^Idris"]
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _uid(rng: np.random.Generator) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def write_dicom_studies(ds_gen: SyntheticPatients, out: Path, bits: int = 12) -> list[Path]:
    """Write every visit of ``ds_gen`` as a DX study under ``out``; returns the files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    maxv = (1 << bits) - 1
    rows = []
    for batch in ds_gen.iter_batches():
        for img, pid, label, visit in zip(batch.images, batch.patient_ids, batch.labels, batch.visits):
            prng = np.random.default_rng([ds_gen.seed, 77, int(pid)])
            vrng = np.random.default_rng([ds_gen.seed, 78, int(pid), int(visit)])
            name = f"{FAMILY[prng.integers(len(FAMILY))]}^{GIVEN[prng.integers(len(GIVEN))]}"
            mrn = f"MRN{prng.integers(10**7, 10**8)}"
            birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(prng.integers(0, 365 * 60)))
            sex = "FM"[int(prng.integers(2))]
            when = dt.datetime(2023, 1, 1, 8) + dt.timedelta(days=int(visit) * 45 + int(vrng.integers(0, 30)), minutes=int(vrng.integers(0, 600)))
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = DX_STORAGE
            sop = _uid(vrng)
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = DX_STORAGE
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = _uid(vrng)
            ds.SeriesInstanceUID = _uid(vrng)
            ds.FrameOfReferenceUID = _uid(vrng)
            ds.PatientName = name
            ds.PatientID = mrn
            ds.PatientBirthDate = birth.strftime("%Y%m%d")
            ds.PatientSex = sex
            ds.PatientAge = f"{(when.date() - birth).days // 365:03d}Y"
            ds.OtherPatientIDs = f"NHS{prng.integers(10**9, 10**10)}"
            ds.PatientAddress = f"{prng.integers(1, 999)} Synthetic Lane, Faketown"
            ds.InstitutionName = INSTITUTIONS[prng.integers(len(INSTITUTIONS))]
            ds.InstitutionAddress = "1 Hospital Road, Faketown"
            ds.ReferringPhysicianName = PHYSICIANS[prng.integers(len(PHYSICIANS))]
            ds.OperatorsName = "Tech^Rae"
            ds.StationName = "DXROOM2"
            ds.DeviceSerialNumber = f"SN{prng.integers(10**5, 10**6)}"
            ds.AccessionNumber = f"ACC{vrng.integers(10**8, 10**9)}"
            ds.StudyID = f"S{vrng.integers(10**4, 10**5)}"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
            ds.StudyDescription = f"CHEST PA {name.split('^')[0].upper()}"
            ds.SeriesDescription = "PA"
            ds.Modality = "DX"
            ds.BodyPartExamined = "CHEST"
            ds.ViewPosition = "PA"
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.Manufacturer = "casemask synthetic"
            ds.SeriesNumber = 1
            ds.InstanceNumber = 1
            ds.PatientOrientation = ["L", "F"]
            ds.BurnedInAnnotation = "NO"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = img.shape[-2:]
            ds.BitsAllocated = 16
            ds.BitsStored = bits
            ds.HighBit = bits - 1
            ds.PixelRepresentation = 0
            ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{350 / img.shape[-1]:.4f}"] * 2
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "US"
            ds.WindowCenter = maxv // 2
            ds.WindowWidth = maxv
            ds.PixelData = np.round((img[0] + 1) / 2 * maxv).astype(np.uint16).tobytes()
            f = out / f"p{int(pid):04d}_v{int(visit):02d}.dcm"
            ds.save_as(f, enforce_file_format=True)
            files.append(f)
            rows.append((f.name, mrn, int(label), CLASSES[int(label)]))
    with (out / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "patient_id", "label", "class"])
        w.writerows(rows)
    return files
