"""Site calibration: a clinic's own confirmed-normal films adapt the model's decisions to its
machines and processing. ``xray-edge calibrate`` fits a small sealed **site profile**;
``classify --site`` (or ``$XRAY_EDGE_SITE``) applies it.

Methods (the default was chosen by the site simulation of the cross-origin protocol,
``train.sitesim``; docs/site-calibration.md):

* ``threshold``: each finding's operating threshold is raised to the ``quantile`` of the site
  normals' probability of that finding (never lowered);
* ``align``: the site's pooled image features are moved so that its normals' mean and spread match
  the training normals' (``scale * x + shift`` per feature, fed to the model's ``site_scale`` and
  ``site_shift`` inputs; only models exported with them);
* ``align+threshold``: both, the thresholds set on the aligned normals.

Every method also re-centres the input gate on the site: its limit is raised, where needed, to the
gate quantile of the site normals' distances, by at most ``GATE_CAP`` (normals farther out are
refused as calibration films: ``usable``), so a clinic whose every film looks a little unfamiliar
is not rejected wholesale while photos and CT slices still are (with ``align`` the distances are
measured on the aligned features).

The profile is JSON bound to one model file (name, version, variant, sha256) and carries a sha256
digest of its own content: an edited, truncated or foreign profile is refused before any image is
read. The digest detects accidental and casual edits; it is not a signature.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .contract import NEGATIVE_CLASS, ModelContractError

SCHEMA = "xray-edge/site-profile"
SCHEMA_VERSION = 1
METHODS = ("threshold", "align", "align+threshold")
# chosen by the site simulation (train/sitesim.py, docs/site-simulation.md): the largest cut in normals called
# a finding on the worst held-out origin with COVID sensitivity kept >= 90 % on every origin, k = 20
DEFAULT_METHOD = "threshold"
DEFAULT_QUANTILE = 0.6  # of the site normals' probability of each finding
ALIGN_SHRINK = 10.0  # pseudo-count of training normals the site's mean and spread are shrunk towards
MIN_NORMALS = 20
GATE_CAP = 2.0  # the gate's limit is raised for a site by at most this factor; normals beyond it are not used
MAX_PROFILE_BYTES = 1 << 20
SCALE_RANGE = (0.25, 4.0)


class SiteProfileError(ModelContractError):
    """A site profile cannot be read or does not fit the model (one line, naming the file)."""


@dataclass(frozen=True)
class Scores:
    """Model outputs for a set of images: class probabilities, gate distances, pooled features."""

    probs: np.ndarray  # (n, C)
    distance: np.ndarray | None  # (n,)
    pooled: np.ndarray | None = None  # (n, K), before any alignment


@dataclass(frozen=True)
class SiteFit:
    """What a profile changes: finding thresholds, the gate's limit, the feature alignment."""

    thresholds: dict[str, float]
    gate_threshold: float | None
    scale: list[float] | None = None
    shift: list[float] | None = None


def usable(distance: np.ndarray, gate: tuple[float, float] | None) -> np.ndarray:
    """Which normals may calibrate: those within ``GATE_CAP`` times the gate's limit (every one
    without a gate)."""
    return np.ones(len(distance), bool) if gate is None else np.asarray(distance) <= GATE_CAP * gate[0]


def alignment(pooled: np.ndarray, mean: np.ndarray, std: np.ndarray, shrink: float = ALIGN_SHRINK,
              spread: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) that move the site normals' ``pooled`` features to the training normals'
    ``mean`` (and ``std`` with ``spread``; else scale 1); the site's own mean and variance are
    shrunk towards the training ones by ``shrink`` pseudo-images (a few films estimate hundreds of
    features poorly)."""
    k = len(pooled)
    site_mean = (k * pooled.mean(axis=0) + shrink * mean) / (k + shrink)
    site_var = (k * pooled.var(axis=0) + shrink * std ** 2) / (k + shrink)
    scale = np.clip(std / np.sqrt(np.maximum(site_var, 1e-12)), *SCALE_RANGE) if spread else np.ones_like(mean)
    return scale.astype(np.float32), (mean - scale * site_mean).astype(np.float32)


def raised_thresholds(thresholds: dict[str, float], classes: Sequence[str], probs: np.ndarray,
                      quantile: float) -> dict[str, float]:
    """Each finding's threshold, raised to the ``quantile`` of the normals' probability of it."""
    return {c: max(t, float(np.quantile(probs[:, list(classes).index(c)], quantile))) for c, t in thresholds.items()}


def fit(method: str, classes: Sequence[str], thresholds: dict[str, float], gate: tuple[float, float] | None,
        normals: Scores, rescore: Callable[[np.ndarray, np.ndarray], Scores] | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None, quantile: float = DEFAULT_QUANTILE,
        shrink: float = ALIGN_SHRINK, spread: bool = True) -> SiteFit:
    """The site correction by ``method`` from the site's ``normals`` (their outputs without one).
    ``gate``: (limit, quantile) of the model's gate, None without one. Alignment needs the
    training normals' ``reference`` (mean, std) and ``rescore`` (scale, shift) -> the normals'
    outputs with that alignment applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    scale = shift = None
    scores = normals
    if method.startswith("align"):
        if reference is None or rescore is None or normals.pooled is None:
            raise SiteProfileError("this model cannot align features (no pooled output and site inputs); "
                                   "use --method threshold")
        scale, shift = alignment(normals.pooled, *reference, shrink, spread)
        scores = rescore(scale, shift)
    fitted = raised_thresholds(thresholds, classes, scores.probs, quantile) if method.endswith("threshold") \
        else dict(thresholds)
    limit = None
    if gate is not None and scores.distance is not None:
        limit = min(max(gate[0], float(np.quantile(scores.distance, gate[1]))), GATE_CAP * gate[0])
    return SiteFit(fitted, limit, None if scale is None else scale.tolist(), None if shift is None else shift.tolist())


@dataclass
class SiteProfile:
    """The sealed file ``calibrate`` writes."""

    site: str
    model_name: str
    model_version: str
    model_variant: str
    model_sha256: str
    method: str
    created: str
    counts: dict[str, Any]
    fitted: SiteFit
    settings: dict[str, float] = field(default_factory=dict)
    effect: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def content_digest(self) -> str:
        d = self.to_dict()
        d.pop("digest")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> "SiteProfile":
        self.digest = self.content_digest()
        return self

    @property
    def label(self) -> str:
        """What every results row says about the profile: site name, method and digest."""
        return f"{self.site} ({self.method}, {self.digest[:12]})"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_profile(path: str | Path) -> SiteProfile:
    """The profile at ``path``, its digest and every field checked; SiteProfileError (one line)
    otherwise."""
    from .files import FileTooLarge, read_regular

    path = Path(path)
    try:
        data = read_regular(path, MAX_PROFILE_BYTES)
    except FileNotFoundError:
        raise SiteProfileError(f"{path}: site profile not found") from None
    except FileTooLarge:
        raise SiteProfileError(f"{path}: too large for a site profile (over {MAX_PROFILE_BYTES >> 10} KiB)") from None
    except OSError as e:
        raise SiteProfileError(f"{path}: cannot read the site profile ({e.strerror or e})") from None
    try:
        d = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise SiteProfileError(f"{path}: not a site profile (not valid JSON: {str(e)[:80]})") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise SiteProfileError(f"{path}: not a site profile (no '{SCHEMA}' schema)")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise SiteProfileError(f"{path}: site profile version {d.get('schema_version')!r} is not supported "
                               f"(this xray-edge reads version {SCHEMA_VERSION})")
    known = set(SiteProfile.__dataclass_fields__)
    if set(d) != known or not isinstance(d.get("fitted"), dict) or set(d["fitted"]) != set(SiteFit.__dataclass_fields__):
        raise SiteProfileError(f"{path}: malformed site profile (fields differ from a profile's)")
    try:
        profile = SiteProfile(**{**d, "fitted": SiteFit(**d["fitted"])})
    except TypeError:
        raise SiteProfileError(f"{path}: malformed site profile") from None
    if not isinstance(profile.digest, str) or profile.content_digest() != profile.digest:
        raise SiteProfileError(f"{path}: the site profile was altered after calibration (its digest does not match)")
    problems = _problems(profile)
    if problems:
        raise SiteProfileError(f"{path}: invalid site profile: {'; '.join(problems)}")
    return profile


def _problems(p: SiteProfile) -> list[str]:
    out = [f"{name} must be a non-empty string" for name in ("site", "model_name", "model_version", "model_variant",
                                                             "model_sha256", "created")
           if not isinstance(getattr(p, name), str) or not getattr(p, name)]
    if p.method not in METHODS:
        out.append(f"method {p.method!r} must be one of {list(METHODS)}")
    f = p.fitted
    if not isinstance(f.thresholds, dict) or not all(isinstance(c, str) and _finite(t) and 0 <= t <= 1
                                                     for c, t in f.thresholds.items()):
        out.append("thresholds must map class names to numbers in [0, 1]")
    if f.gate_threshold is not None and not (_finite(f.gate_threshold) and f.gate_threshold > 0):
        out.append("gate_threshold must be a positive number or null")
    vectors = [v for v in (f.scale, f.shift) if v is not None]
    if (f.scale is None) != (f.shift is None) or p.method.startswith("align") != bool(vectors):
        out.append("scale and shift must both be given for an alignment method, and only then")
    for v in vectors:
        if not isinstance(v, list) or not v or not all(_finite(x) for x in v) or len(v) != len(vectors[0]):
            out.append("scale and shift must be lists of finite numbers of one length")
            break
    if f.scale is not None and not out and not all(SCALE_RANGE[0] <= x <= SCALE_RANGE[1] for x in f.scale):
        out.append(f"scale values must lie in {list(SCALE_RANGE)}")
    return out


def check_fits(profile: SiteProfile, path: str | Path, model: Any) -> None:
    """Refuse a profile fitted for another model file, or one this model cannot apply."""
    r = model.record
    if profile.model_sha256 != model.sha256:
        raise SiteProfileError(f"{path}: the site profile was fitted for {profile.model_name} {profile.model_version} "
                               f"{profile.model_variant} (sha256 {profile.model_sha256[:12]}...), not this model "
                               f"({model.label}, {model.sha256[:12]}...); calibrate again with this model")
    if set(profile.fitted.thresholds) != set(r.thresholds) or set(profile.fitted.thresholds) & {NEGATIVE_CLASS}:
        raise SiteProfileError(f"{path}: the site profile's thresholds do not name this model's findings")
    if (profile.fitted.gate_threshold is None) != (r.gate is None):
        raise SiteProfileError(f"{path}: the site profile's gate does not match this model's")
    if profile.fitted.scale is not None and (not r.site_inputs or len(profile.fitted.scale)
                                             != len(r.site_reference.normal_mean)):
        raise SiteProfileError(f"{path}: the site profile aligns features this model has no site inputs for")


def apply(model: Any, profile: SiteProfile, path: str | Path) -> Any:
    """``model`` (a ``session.LoadedModel``) with the profile's thresholds and gate limit in its
    record and the profile attached (``session.predict`` feeds its alignment to the site inputs);
    SiteProfileError if it does not fit."""
    check_fits(profile, path, model)
    gate, fitted = model.record.gate, profile.fitted
    record = replace(model.record, thresholds=dict(fitted.thresholds),
                     gate=None if gate is None else replace(gate, threshold=fitted.gate_threshold))
    return replace(model, record=record, site=profile)


def reference(record: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The training normals' (mean, std) a model's record carries, for alignment (None without)."""
    ref = record.site_reference
    return None if ref is None or not record.site_inputs else (np.asarray(ref.normal_mean), np.asarray(ref.normal_std))
