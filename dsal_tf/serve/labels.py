"""Label Studio's side of a mask: the labelling config's tags and the brush regions (RLE).

A project's labelling config is read, never assumed: the `BrushLabels` tag names the control
(`from_name`), its `toName` the `Image` tag (`to_name`), whose `value="$key"` says which task field
holds the image URL. A brush region is `{"type": "brushlabels", "value": {"format": "rle", "rle":
[...], "brushlabels": [label]}}` at the image's original size; the RLE of an RGBA image (alpha =
the mask) is label-studio-sdk's (`label_studio_sdk.converter.brush`, extra `[labelstudio]`).

Checking an annotation (`check_results`) reads only its JSON, so a webhook answers at once; decoding
the RLE (`mask_from_results`) is the worker's.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DsalError

LABEL = "lesion"  # the foreground's label in the config `dsal serve --connect` creates
COLOUR = "#00ff00"  # its brush colour: green, far from skin and lesion tones (the browser test looks for it)
BRUSH = "brushlabels"


class BadRequest(DsalError):
    """Input a client sent that cannot be used (HTTP 4xx); `status` says which."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LabelConfig:
    """The tags of a labelling config that a mask needs."""

    image: str  # the Image tag's name (a region's to_name)
    image_key: str  # the task field with the image URL ("image" for value="$image")
    brush: str  # the BrushLabels tag's name (a region's from_name)
    label: str  # the foreground label among the BrushLabels' labels


def label_config_xml(label: str = LABEL, colour: str = COLOUR) -> str:
    """The labelling config `dsal serve --connect` gives a new project: one image, one brush label."""
    return (f'<View>\n  <Image name="image" value="$image" zoom="true" zoomControl="true"/>\n'
            f'  <BrushLabels name="label" toName="image">\n    <Label value="{label}" background="{colour}"/>\n'
            f'  </BrushLabels>\n</View>\n')


def parse_label_config(xml: str, label: str | None = None) -> LabelConfig:
    """The Image and BrushLabels tags of `xml`, found by type; `label` picks the foreground when the
    BrushLabels tag has several (default: its only label). A config without them is refused."""
    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError as exc:
        raise BadRequest(f"the labelling config is not XML ({exc}); use a config with an Image and a BrushLabels "
                         "tag", 400) from None
    brushes = [t for t in root.iter("BrushLabels") if t.get("name")]
    images = {t.get("name"): t for t in root.iter("Image") if t.get("name")}
    if not brushes or not images:
        missing = " and ".join(n for n, found in (("an Image", images), ("a BrushLabels", brushes)) if not found)
        raise BadRequest(f"the labelling config has no {missing} tag; dsal segments images with a brush, e.g.\n"
                         + label_config_xml(), 400)
    brush = next((b for b in brushes if b.get("toName") in images), None)
    if brush is None:
        raise BadRequest(f"the BrushLabels tag {brushes[0].get('name')!r} points at {brushes[0].get('toName')!r}, "
                         f"not at an Image tag ({sorted(images)}); set its toName to the image", 400)
    labels = [t.get("value") for t in brush.iter("Label") if t.get("value")]
    chosen = label if label is not None else (labels[0] if len(labels) == 1 else LABEL)
    if chosen not in labels:
        raise BadRequest(f"the BrushLabels tag {brush.get('name')!r} has labels {labels}, none of them {chosen!r}; "
                         "start dsal serve with --label NAME (the foreground's label)", 400)
    value = images[brush.get("toName")].get("value", "")
    return LabelConfig(brush.get("toName"), value.lstrip("$"), brush.get("name"), chosen)


def task_name(data: dict, key: str = "image") -> str:
    """The pool image a task shows: its `name` field, else the file name in its image URL (without the
    prefix Label Studio gives an uploaded file)."""
    if data.get("name"):
        return str(data["name"])
    url = str(data.get(key) or next((v for v in data.values() if isinstance(v, str)), ""))
    stem = Path(url.split("?d=")[-1].split("?")[0]).stem
    return re.sub(r"^[0-9a-f]{8}-", "", stem)


# ------------------------------------------------------------------ masks <-> regions
def encode(mask: np.ndarray) -> list[int]:
    """The brush RLE of a {0,1} [H,W] mask (all four RGBA channels 255 on the foreground)."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle((np.asarray(mask) > 0).astype(np.uint8) * 255)


def decode(rle: list[int], height: int, width: int) -> np.ndarray:
    """bool [H,W]: the alpha channel of a brush RLE."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = np.asarray(decode_rle(rle))
    if flat.size != height * width * 4:
        raise BadRequest(f"a brush RLE holds {flat.size // 4} pixels for a {width}x{height} image; "
                         "the region was drawn on another image")
    return flat.reshape(height, width, 4)[..., 3] > 0


def prediction(mask: np.ndarray | None, cfg: LabelConfig, score: float | None, model_version: str) -> dict:
    """A Label Studio prediction: the mask as one brush region at its own size (none for an empty or
    missing mask), the score Label Studio's uncertainty sampling orders by, and the model version."""
    result = []
    if mask is not None and np.any(mask):
        h, w = mask.shape[:2]
        result.append({"from_name": cfg.brush, "to_name": cfg.image, "type": BRUSH,
                       "original_width": int(w), "original_height": int(h), "image_rotation": 0,
                       "value": {"format": "rle", "rle": encode(mask), "brushlabels": [cfg.label]}})
    return {"result": result, "score": score, "model_version": model_version}


def check_results(results: list, cfg: LabelConfig, size: tuple[int, int], where: str) -> None:
    """An annotation's regions are brush strokes of `cfg.label` on an image of `size` (rows, cols);
    otherwise a `BadRequest` naming the annotation (`where`) and the fix. No region = an empty mask."""
    if not isinstance(results, list):
        raise BadRequest(f"{where}: its result is not a list of regions")
    for res in results:
        kind = res.get("type") if isinstance(res, dict) else type(res).__name__
        if kind != BRUSH:
            raise BadRequest(f"{where} has a {kind!r} region; dsal needs masks drawn with the brush "
                             f"({cfg.brush!r}, label {cfg.label!r})")
        value = res.get("value") or {}
        labels = value.get(BRUSH) or []
        if res.get("from_name") != cfg.brush or any(lab != cfg.label for lab in labels):
            raise BadRequest(f"{where} has a brush region labelled {labels} from {res.get('from_name')!r}; this run "
                             f"segments {cfg.label!r} ({cfg.brush!r}): relabel or delete the region")
        if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
            raise BadRequest(f"{where} has a brush region without an RLE mask (format {value.get('format')!r})")
        got = (res.get("original_height"), res.get("original_width"))
        if tuple(got) != tuple(size):
            raise BadRequest(f"{where} was drawn at {got[1]}x{got[0]} but its image is {size[1]}x{size[0]}; "
                             "annotate the image the task shows")


def mask_from_results(results: list, cfg: LabelConfig, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H,W] 0/255: the union of the brush regions (checked first with `check_results`)."""
    mask = np.zeros(size, bool)
    for res in results:
        mask |= decode(res["value"]["rle"], *size)
    return mask.astype(np.uint8) * 255
