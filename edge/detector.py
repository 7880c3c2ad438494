"""Object detection on onnxruntime, with models described by ``models/manifest.yaml``.

The manifest says, per model, where the file is, its sha256, its classes, how a frame is
turned into the input tensor and which decoder reads the outputs (``postprocess.kind``).
A new model family is one :class:`OnnxDetector` subclass registered in ``_DECODERS``.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_MANIFEST",
    "Detection",
    "Detector",
    "DetectorConfig",
    "DetectorError",
    "Manifest",
    "ModelEntry",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "NanoDetGflDetector",
    "OnnxDetector",
    "SsdTfDetector",
    "file_sha256",
    "load_detector",
    "load_manifest",
    "sidecar_path",
]

logger = logging.getLogger(__name__)

# models/ is data beside the packages, not a package: found from the source tree.
DEFAULT_MANIFEST = Path(__file__).resolve().parents[1] / "models" / "manifest.yaml"

FloatArray = npt.NDArray[np.float32]


class DetectorError(Exception):
    """A detector could not be built from its configuration and manifest."""


class ModelNotFoundError(DetectorError):
    """The manifest has no such model id, or its file is not on disk."""


class ModelIntegrityError(DetectorError):
    """The model file on disk is not the one the manifest describes."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Detection:
    """One object found in one frame."""

    cls: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the input frame


class Detector(Protocol):
    """Anything that turns a BGR frame into detections."""

    model_id: str
    model_version: str

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]: ...


# --------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How a BGR frame becomes the model's input tensor."""

    name: str = Field(description="input tensor name in the ONNX graph")
    width: int | None = Field(description="model input width; null: the frame's own size")
    height: int | None = Field(description="model input height; null: the frame's own size")
    layout: Literal["NCHW", "NHWC"]
    dtype: Literal["float32", "uint8"]
    colour: Literal["BGR", "RGB"] = Field(description="channel order the model expects")
    resize: Literal["letterbox", "stretch", "none"] = Field(
        description="letterbox keeps the aspect ratio and pads right/bottom; none feeds the frame"
    )
    mean: tuple[float, float, float] | None = Field(
        default=None, description="subtracted per channel, in the model's channel order"
    )
    std: tuple[float, float, float] | None = Field(
        default=None, description="divided per channel after the mean, in the model's order"
    )

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height are both set or both null")
        if self.resize != "none" and self.width is None:
            raise ValueError(f"resize {self.resize!r} needs width and height")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std are both set or both null")
        if self.dtype == "uint8" and self.mean is not None:
            raise ValueError("a uint8 input takes raw pixels: no mean/std")
        return self


class GflLevel(_Strict):
    stride: int = Field(gt=0)
    scores: str = Field(description="output tensor [1, H*W, classes], sigmoid already applied")
    boxes: str = Field(description="output tensor [1, H*W, 4*(reg_max+1)] of distance bins")


class NanoDetGflPost(_Strict):
    """NanoDet head: per-level class scores and GFL distance distributions."""

    kind: Literal["nanodet_gfl"]
    reg_max: int = Field(gt=0, description="distance bins per side minus one")
    levels: list[GflLevel] = Field(min_length=1)
    score_threshold: float = Field(gt=0, lt=1, description="default minimum score")
    nms_iou: float = Field(gt=0, lt=1, description="default NMS overlap limit")


class SsdTfPost(_Strict):
    """TensorFlow Object Detection API graph: NMS inside, normalised [ymin, xmin, ymax, xmax]."""

    kind: Literal["ssd_tf"]
    boxes: str
    scores: str
    classes: str
    count: str
    score_threshold: float = Field(gt=0, lt=1)
    nms_iou: float = Field(gt=0, lt=1, description="cross-class NMS for merged class groups")


PostprocessSpec = Annotated[NanoDetGflPost | SsdTfPost, Field(discriminator="kind")]


class OriginFile(_Strict):
    path: str = Field(description="path inside the registry package")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Origin(_Strict):
    """Where the model comes from and how ``scripts/build_model.py`` rebuilds it."""

    registry: Literal["npm", "pypi"]
    package: str
    version: str
    package_digest: str = Field(description="npm dist.integrity, or sha256 of the PyPI file")
    files: list[OriginFile] = Field(min_length=1)
    convert: Literal["tf2onnx_tfjs", "tf2onnx_graphdef"]
    converter: list[str] = Field(description="pinned pip requirements of the conversion venv")
    opset: int
    graph_inputs: list[str] = Field(default_factory=list)
    graph_outputs: list[str] = Field(default_factory=list)
    upstream: str = Field(description="the original model and its licence")


class ModelEntry(_Strict):
    id: str
    version: str
    description: str
    file: str = Field(description="file name inside models/")
    committed: bool = Field(description="false: build it with scripts/build_model.py first")
    sha256: str | None = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="of the committed file; null for a built-here model, whose build writes "
        "<file>.sha256 beside it (tf2onnx output is not byte-reproducible)",
    )
    size_bytes: int | None = Field(gt=0)
    licence: str
    input: InputSpec
    postprocess: PostprocessSpec
    classes: list[str | None] = Field(
        min_length=1, description="class name by model class id; null for ids the model skips"
    )
    origin: Origin

    @model_validator(mode="after")
    def _committed_has_digest(self) -> ModelEntry:
        if self.committed and (self.sha256 is None or self.size_bytes is None):
            raise ValueError(f"committed model {self.id!r} needs sha256 and size_bytes")
        return self


def sidecar_path(model_path: Path) -> Path:
    """Where a locally built model's sha256 is kept."""
    return model_path.with_name(model_path.name + ".sha256")


class Manifest(_Strict):
    schema_version: Literal[1]
    default: str
    models: list[ModelEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids(self) -> Manifest:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("model ids must be unique")
        if self.default not in ids:
            raise ValueError(f"default {self.default!r} is not a model id")
        return self

    def get(self, model_id: str | None) -> ModelEntry:
        wanted = model_id or self.default
        for entry in self.models:
            if entry.id == wanted:
                return entry
        known = ", ".join(m.id for m in self.models)
        raise ModelNotFoundError(f"no model {wanted!r} in the manifest (known: {known})")


def load_manifest(path: Path = DEFAULT_MANIFEST) -> Manifest:
    """Read and validate a model manifest."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read model manifest {path}: {exc}") from exc
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise DetectorError(f"invalid model manifest {path}: {exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- config


class DetectorConfig(BaseModel):
    """Which model to run and how to filter what it finds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        default=None, description="model id in the manifest; the manifest's default when unset"
    )
    manifest: Path | None = Field(
        default=None, description="manifest file; the repository's models/manifest.yaml when unset"
    )
    threads: int = Field(default=2, ge=1, le=64, description="onnxruntime intra-op threads")
    score_threshold: float | None = Field(
        default=None, gt=0, lt=1, description="minimum score; the model's default when unset"
    )
    nms_iou: float | None = Field(
        default=None, gt=0, lt=1, description="NMS overlap limit; the model's default when unset"
    )
    classes: list[str] | None = Field(
        default=None, description="report only these class names (e.g. person, car); all if unset"
    )
    merge_classes: list[list[str]] = Field(
        default_factory=lambda: [["car", "truck", "bus"]],
        description="classes suppressed together in NMS: one van seen as car and truck is one box",
    )
    verify_sha256: bool = Field(
        default=True, description="check the model file against the manifest before loading"
    )


# --------------------------------------------------------------------------- detectors


@dataclass(frozen=True, slots=True)
class _Transform:
    """Maps model-input pixels back to frame pixels: frame = input / scale."""

    scale_x: float
    scale_y: float
    frame_w: int
    frame_h: int


class OnnxDetector(ABC):
    """Shared half of every ONNX detector: session, preprocessing, filtering and NMS.

    Subclasses decode raw outputs into boxes in model-input pixels, scores and class ids.
    """

    kind: ClassVar[str]

    def __init__(self, entry: ModelEntry, model_path: Path, config: DetectorConfig) -> None:
        self.entry = entry
        self.model_id = entry.id
        self.model_version = entry.version
        spec = entry.postprocess
        self.score_threshold = config.score_threshold or spec.score_threshold
        self.nms_iou = config.nms_iou or spec.nms_iou
        self._input = entry.input
        self._mean = np.asarray(entry.input.mean or (0.0, 0.0, 0.0), dtype=np.float32)
        self._inv_std = 1.0 / np.asarray(entry.input.std or (1.0, 1.0, 1.0), dtype=np.float32)
        names = entry.classes
        known = {n for n in names if n is not None}
        wanted = set(config.classes) if config.classes is not None else known
        unknown = wanted - known
        for group in config.merge_classes:
            unknown |= set(group) - known
        if unknown:
            raise DetectorError(
                f"model {entry.id!r} has no class {sorted(unknown)}; it knows {sorted(known)}"
            )
        self._keep = np.array([n is not None and n in wanted for n in names], dtype=bool)
        # NMS group per class id: merged classes share one group, others their own id.
        groups = np.arange(len(names), dtype=np.int64)
        for g, group in enumerate(config.merge_classes):
            for name in group:
                groups[names.index(name)] = len(names) + g
        self._nms_group = groups

        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads would otherwise spin after each run and starve the capture,
        # tracking and publishing work that shares these few cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise DetectorError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        self._output_names = self.output_names()
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = set(self._output_names) - graph_outputs
        if missing or self._input.name not in {i.name for i in self.session.get_inputs()}:
            raise DetectorError(
                f"model {entry.id!r} lacks tensors the manifest names: {sorted(missing)}"
            )
        logger.info(
            "detector %s %s loaded (%s, %d threads)",
            entry.id,
            entry.version,
            self.kind,
            config.threads,
        )

    # -- steps a subclass provides

    @abstractmethod
    def output_names(self) -> list[str]:
        """Output tensors to fetch, in the order :meth:`decode` reads them."""

    @abstractmethod
    def decode(
        self, outputs: Sequence[np.ndarray], transform: _Transform
    ) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
        """Return boxes (N, 4) x1y1x2y2 in model-input pixels, scores (N,), class ids (N,).

        Classes not in the keep mask and scores under the threshold may already be gone.
        """

    # -- shared steps

    def preprocess(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, _Transform]:
        """Turn a BGR frame into the input tensor, and remember how to map boxes back."""
        spec = self._input
        h, w = frame_bgr.shape[:2]
        img = frame_bgr
        sx = sy = 1.0
        if spec.resize != "none" and spec.width is not None and spec.height is not None:
            if spec.resize == "letterbox":
                sx = sy = min(spec.width / w, spec.height / h)
                nw, nh = max(1, round(w * sx)), max(1, round(h * sy))
            else:
                sx, sy = spec.width / w, spec.height / h
                nw, nh = spec.width, spec.height
            img = cv2.resize(frame_bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
        if spec.colour == "RGB":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        out_h = spec.height if spec.resize != "none" and spec.height else img.shape[0]
        out_w = spec.width if spec.resize != "none" and spec.width else img.shape[1]
        if spec.dtype == "uint8":
            canvas = np.zeros((out_h, out_w, 3), dtype=np.uint8)
            canvas[: img.shape[0], : img.shape[1]] = img
            tensor: np.ndarray = canvas[np.newaxis]
            if spec.layout == "NCHW":
                tensor = tensor.transpose(0, 3, 1, 2)
            return np.ascontiguousarray(tensor), _Transform(sx, sy, w, h)
        # Padding is zero after normalisation, i.e. the mean colour: it adds no edges.
        ih, iw = img.shape[:2]
        if spec.layout == "NCHW":
            # Channel by channel straight into the planar buffer: no HWC float temporary and
            # no transpose copy (about 4x faster than the broadcast version on 416x416).
            tensor = np.zeros((1, 3, out_h, out_w), dtype=np.float32)
            for c in range(3):
                tensor[0, c, :ih, :iw] = (img[:, :, c] - self._mean[c]) * self._inv_std[c]
        else:
            tensor = np.zeros((1, out_h, out_w, 3), dtype=np.float32)
            tensor[0, :ih, :iw] = (img - self._mean) * self._inv_std
        return tensor, _Transform(sx, sy, w, h)

    def infer(self, tensor: np.ndarray) -> list[np.ndarray]:
        """Run the bare session on a preprocessed tensor."""
        outputs = self.session.run(self._output_names, {self._input.name: tensor})
        return [np.asarray(o) for o in outputs]

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 BGR frame, got shape {frame_bgr.shape}")
        tensor, transform = self.preprocess(frame_bgr)
        boxes, scores, class_ids = self.decode(self.infer(tensor), transform)
        if len(scores) == 0:
            return []
        mask = (scores >= self.score_threshold) & self._keep[class_ids]
        boxes, scores, class_ids = boxes[mask], scores[mask], class_ids[mask]
        if len(scores) == 0:
            return []
        boxes = boxes / np.array(
            [transform.scale_x, transform.scale_y, transform.scale_x, transform.scale_y],
            dtype=np.float32,
        )
        np.clip(boxes[:, 0::2], 0, transform.frame_w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, transform.frame_h, out=boxes[:, 1::2])
        keep = self._nms(boxes, scores, class_ids)
        names = self.entry.classes
        return [
            Detection(
                cls=str(names[int(class_ids[i])]),
                score=float(scores[i]),
                box=(
                    float(boxes[i, 0]),
                    float(boxes[i, 1]),
                    float(boxes[i, 2]),
                    float(boxes[i, 3]),
                ),
            )
            for i in keep
        ]

    def _nms(
        self, boxes: FloatArray, scores: FloatArray, class_ids: npt.NDArray[np.int64]
    ) -> list[int]:
        # One NMS call for all groups: shifting each group far apart means boxes of
        # different groups never overlap, so they never suppress each other.
        _, dense = np.unique(self._nms_group[class_ids], return_inverse=True)
        span = float(boxes.max()) + 1.0
        shifted = boxes + (dense.astype(np.float32) * span)[:, None]
        xywh = np.concatenate([shifted[:, :2], shifted[:, 2:] - shifted[:, :2]], axis=1)
        idx = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.score_threshold, self.nms_iou)
        order = [int(i) for i in np.asarray(idx).reshape(-1)]
        return sorted(order, key=lambda i: -float(scores[i]))


class NanoDetGflDetector(OnnxDetector):
    """NanoDet-style anchor-free head with Generalized Focal Loss box distributions."""

    kind = "nanodet_gfl"

    def __init__(self, entry: ModelEntry, model_path: Path, config: DetectorConfig) -> None:
        spec = entry.postprocess
        if not isinstance(spec, NanoDetGflPost) or entry.input.width is None:
            raise DetectorError(f"model {entry.id!r} is not a fixed-size nanodet_gfl model")
        self._spec = spec
        width = entry.input.width
        height = entry.input.height or width
        # Grid centres per level, computed once: (x + 0.5) * stride, row-major like the head.
        self._centres: list[FloatArray] = []
        for level in spec.levels:
            gw = -(-width // level.stride)
            gh = -(-height // level.stride)
            ys, xs = np.mgrid[0:gh, 0:gw]
            centres = np.stack([(xs.ravel() + 0.5), (ys.ravel() + 0.5)], axis=1) * level.stride
            self._centres.append(centres.astype(np.float32))
        self._bins = np.arange(spec.reg_max + 1, dtype=np.float32)
        super().__init__(entry, model_path, config)

    def output_names(self) -> list[str]:
        names: list[str] = []
        for level in self._spec.levels:
            names += [level.scores, level.boxes]
        return names

    def decode(
        self, outputs: Sequence[np.ndarray], transform: _Transform
    ) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
        all_boxes: list[FloatArray] = []
        all_scores: list[FloatArray] = []
        all_ids: list[npt.NDArray[np.int64]] = []
        bins = self._spec.reg_max + 1
        for k, level in enumerate(self._spec.levels):
            cls = outputs[2 * k][0]
            reg = outputs[2 * k + 1][0]
            # Unwanted classes cannot win the per-cell arg-max.
            masked = np.where(self._keep[np.newaxis, : cls.shape[1]], cls, 0.0)
            ids = masked.argmax(axis=1)
            best = masked[np.arange(len(ids)), ids]
            cand = np.nonzero(best >= self.score_threshold)[0]
            if len(cand) == 0:
                continue
            logits = reg[cand].reshape(len(cand), 4, bins)
            logits = logits - logits.max(axis=2, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=2, keepdims=True)
            dist = (prob @ self._bins) * level.stride  # left, top, right, bottom
            c = self._centres[k][cand]
            boxes = np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1)
            all_boxes.append(boxes.astype(np.float32))
            all_scores.append(best[cand].astype(np.float32))
            all_ids.append(ids[cand].astype(np.int64))
        if not all_boxes:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros((0,), np.float32),
                np.zeros((0,), np.int64),
            )
        return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_ids)


class SsdTfDetector(OnnxDetector):
    """TensorFlow Object Detection API export: boxes come out already suppressed."""

    kind = "ssd_tf"

    def __init__(self, entry: ModelEntry, model_path: Path, config: DetectorConfig) -> None:
        spec = entry.postprocess
        if not isinstance(spec, SsdTfPost):
            raise DetectorError(f"model {entry.id!r} is not an ssd_tf model")
        self._spec = spec
        super().__init__(entry, model_path, config)

    def output_names(self) -> list[str]:
        s = self._spec
        return [s.boxes, s.scores, s.classes, s.count]

    def decode(
        self, outputs: Sequence[np.ndarray], transform: _Transform
    ) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
        count = int(outputs[3].reshape(-1)[0])
        norm = outputs[0][0][:count]  # ymin, xmin, ymax, xmax in [0, 1] of the input
        scores = outputs[1][0][:count].astype(np.float32)
        ids = outputs[2][0][:count].astype(np.int64)
        in_w = transform.frame_w * transform.scale_x
        in_h = transform.frame_h * transform.scale_y
        boxes = np.stack(
            [norm[:, 1] * in_w, norm[:, 0] * in_h, norm[:, 3] * in_w, norm[:, 2] * in_h], axis=1
        ).astype(np.float32)
        valid = (ids >= 0) & (ids < len(self.entry.classes))
        return boxes[valid], scores[valid], ids[valid]


_DECODERS: dict[str, type[OnnxDetector]] = {
    NanoDetGflDetector.kind: NanoDetGflDetector,
    SsdTfDetector.kind: SsdTfDetector,
}


def load_detector(config: DetectorConfig | None = None) -> OnnxDetector:
    """Build the detector the config names, after checking the model file's sha256."""
    config = config or DetectorConfig()
    manifest_path = config.manifest or DEFAULT_MANIFEST
    manifest = load_manifest(manifest_path)
    entry = manifest.get(config.model)
    model_path = manifest_path.parent / entry.file
    if not model_path.is_file():
        hint = "" if entry.committed else f" (build it: python scripts/build_model.py {entry.id})"
        raise ModelNotFoundError(f"model file {model_path} is missing{hint}")
    if config.verify_sha256:
        expected, said_by = entry.sha256, "the manifest"
        if expected is None:
            sidecar = sidecar_path(model_path)
            try:
                expected, said_by = sidecar.read_text(encoding="ascii").split()[0], str(sidecar)
            except (OSError, IndexError) as exc:
                raise ModelIntegrityError(
                    f"{sidecar} is missing: rebuild with python scripts/build_model.py {entry.id}"
                ) from exc
        actual = file_sha256(model_path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{model_path} has sha256 {actual}, {said_by} says {expected}"
            )
    return _DECODERS[entry.postprocess.kind](entry, model_path, config)
