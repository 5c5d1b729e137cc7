"""The heatmap of one classified radiograph as a secondary-capture image in the source's study
(highdicom): the picture ``classify.row_for`` drew (what the model saw, the heat of the most
likely class, the class, its probability and the decision written on it) with a footer that says
what it is, burned in. RGB, 8 bits; it references its source image and says its annotation is
burned in."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from .sr import MANUFACTURER, with_type2

if TYPE_CHECKING:
    from ..session import LoadedModel

SERIES_DESCRIPTION = "xray-edge heatmap: research aid, not for diagnostic use"
SERIES_NUMBER = 9902
FOOTER = ("xray-edge: research screening aid,", "not for diagnostic use")
_ORIENTATIONS = set("LRAPHF")


def footed(picture: np.ndarray, lines: list[str]) -> np.ndarray:
    """The BGR ``picture`` with a black footer holding ``lines`` of white text."""
    height = 22 * len(lines) + 10
    footer = np.zeros((height, picture.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(footer, line, (8, 22 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([picture, footer])


def build(source: Dataset, heatmap_png: bytes, row: dict[str, Any], model: LoadedModel, series_uid: str,
          sop_uid: str) -> hd.sc.SCImage:
    """The secondary capture of ``heatmap_png`` (the row's picture) for ``source`` (its header)."""
    picture = cv2.imdecode(np.frombuffer(heatmap_png, np.uint8), cv2.IMREAD_COLOR)
    if picture is None:
        raise ValueError("the heatmap picture cannot be decoded")
    lines = [*FOOTER, f"model {model.label}", *([f"site {model.site.site}"[:60]] if model.site is not None else [])]
    rgb = np.ascontiguousarray(cv2.cvtColor(footed(picture, lines), cv2.COLOR_BGR2RGB))
    orientation = _orientation(source)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_type2(source), pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION, content_qualification="RESEARCH")
    if orientation is None:
        image.PatientOrientation = ""  # unknown: the source does not say (Type 2)
    image.BurnedInAnnotation = "YES"
    image.DerivationDescription = (f"xray-edge heatmap (Grad-CAM of {row['label']}) on the model's input; "
                                   f"decision {row['decision']}")[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    image.SourceImageSequence = [reference]
    return image


def _orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation if it gives two valid directions (the picture is a crop
    of the image, turned the same way)."""
    value = source.get("PatientOrientation")
    if value is None or getattr(value, "__len__", None) is None or isinstance(value, str) or len(value) != 2:
        return None
    parts = (str(value[0]), str(value[1]))
    return parts if all(0 < len(p) <= 3 and set(p) <= _ORIENTATIONS for p in parts) else None
