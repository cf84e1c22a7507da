"""Feature rows → scores through one onnxruntime session, tuned for a small CPU.

Missing features (a sensor that went quiet, a machine that never sends it) are imputed with the training mean —
zero after normalisation — and the row is marked degraded. A model whose contract says
`input_layout = "features+missing_mask"` is also told which ones were missing (one flag per feature), so it can
tell "missing" from "at the mean". A window is not scored at all (counted) when it lacks one of the contract's
`required_features` or more than its `max_missing_fraction` of features: never scored on silent zeros.

The familiarity guard (the contract's `familiarity`): a window whose present features lie more than `margin`
training standard deviations outside the range the training set covered is *unfamiliar*: the model never saw
anything like it, so its answer is not a score (an MLP's softmax is confident far from its data). Computed here
from the contract, not by the network, so the fp32 and int8 models of one build agree on it exactly.
A non-finite model output is never a score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.config import ModelConfig
from agent.contract import Contract, ContractError, parse_contract

_MODEL = ModelConfig()  # the defaults of `[model] threads` and `batch_windows`, for callers without a config


class ModelLoadError(ValueError):
    """A model file that onnxruntime cannot load."""


@dataclass(slots=True)
class ScoreBatch:
    scores: npt.NDArray[np.float64]  # NaN where not scored
    labels: list[str]  # most likely non-healthy class per row
    missing: npt.NDArray[np.float64]  # fraction of features missing per row
    scored: npt.NDArray[np.bool_]  # a score to act on: required features present, familiar, finite output
    present: npt.NDArray[np.bool_]  # (rows, features): which features the window had
    missing_required: npt.NDArray[np.bool_]  # not scored: a required feature (or too many) missing
    unfamiliar: npt.NDArray[np.bool_]  # not scored: outside the training envelope
    outside: npt.NDArray[np.bool_]  # (rows, features): the features responsible
    distance: npt.NDArray[np.float64]  # how far outside the envelope, in training std (0 inside; NaN: not checked)


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def open_session(model: Path | bytes, threads: int = _MODEL.threads) -> ort.InferenceSession:
    """An onnxruntime session for a model file or the model's bytes; ModelLoadError with onnxruntime's reason."""
    where = "the model" if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for corrupt files
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"{where}: onnxruntime cannot load it: {first}") from None


class Scorer:
    def __init__(
        self, session: ort.InferenceSession, contract: Contract, path: Path | None = None,
        batch: int = _MODEL.batch_windows,
    ) -> None:
        self.session = session
        self.batch = batch  # most windows per onnxruntime call: bounds the memory and latency of one call
        self.contract = contract
        self.path = path
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if contract.input_name not in inputs:
            raise ContractError(f"model has no input named {contract.input_name!r} (has {sorted(inputs)})")
        if contract.output_name not in outputs:
            raise ContractError(f"model has no output named {contract.output_name!r} (has {sorted(outputs)})")
        shape = inputs[contract.input_name].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != contract.input_width):
            flags = " and their missing flags" if contract.input_width != len(contract.features) else ""
            raise ContractError(f"model input shape {shape} does not take {len(contract.features)} features{flags}")
        self._mean = np.asarray(contract.mean, np.float64)
        self._std = np.asarray(contract.std, np.float64)
        self._healthy = contract.classes.index(contract.healthy_class)
        self._mask = contract.input_layout == "features+missing_mask"
        names = [f.name for f in contract.features]
        self._required = np.array([n in contract.required_features for n in names], bool)
        fam = contract.familiarity
        self._lo = np.asarray(fam.z_lo, np.float64) if fam is not None else None
        self._hi = np.asarray(fam.z_hi, np.float64) if fam is not None else None
        self._margin = fam.margin if fam is not None else math.inf
        self.windows_scored = 0
        self.windows_skipped = 0
        self.windows_degraded = 0
        self.windows_unfamiliar = 0
        self.invalid_outputs = 0
        self.warm_runs = 0  # runs before the first window (`warmed_up`)

    @classmethod
    def load(cls, path: Path, threads: int = _MODEL.threads, batch: int = _MODEL.batch_windows) -> Scorer:
        if not Path(path).is_file():
            raise ModelLoadError(f"{path}: no such model file")
        sess = open_session(Path(path), threads)
        meta = sess.get_modelmeta().custom_metadata_map
        return cls(sess, parse_contract(meta), path, batch).warmed_up()

    @classmethod
    def load_bytes(cls, data: bytes, threads: int = _MODEL.threads, batch: int = _MODEL.batch_windows) -> Scorer:
        """A scorer for a model held in memory (a verified package's): ModelLoadError, ContractError as `load`."""
        sess = open_session(data, threads)
        return cls(sess, parse_contract(sess.get_modelmeta().custom_metadata_map), None, batch).warmed_up()

    def warmed_up(self) -> Scorer:
        """One run on a row of training means before the first window: onnxruntime's first run allocates and
        prepares its kernels and takes many times longer than the next, which a shadow run would otherwise count
        as the candidate's latency. A model that fails here fails again on its first window, where it is counted."""
        try:
            self._run(np.zeros((1, self.contract.input_width), np.float32))
            self.warm_runs += 1
        except Exception:  # onnxruntime's own exception types; judged on live windows, not here
            pass
        return self

    def check_signals(self, available: set[str]) -> None:
        """Refuse a model that needs signals this vehicle cannot produce."""
        missing = [s for s in self.contract.signals if s not in available]
        if missing:
            raise ContractError(f"model needs signals this agent cannot decode: {', '.join(missing)}")

    def normalise(self, x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        """The model's input rows (standardised, missing at 0, then the missing flags if the layout has them) and
        the share of features missing per row."""
        z = (x - self._mean) / self._std
        bad = ~np.isfinite(z)
        missing = bad.mean(axis=1) if z.size else np.zeros(len(x))
        z[bad] = 0.0
        if self._mask:
            z = np.hstack([z, bad.astype(np.float64)])
        return z.astype(np.float32), missing

    def familiar(self, x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Per row, the guard's measure — how far (training std) its present features lie outside the training
        envelope, the largest over features — and which features lie beyond the margin."""
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if self._lo is None or self._hi is None:
            return np.zeros(len(x)), np.zeros(x.shape, bool)
        with np.errstate(invalid="ignore"):
            z = (x - self._mean) / self._std
            excess = np.maximum(self._lo - z, z - self._hi)
        excess = np.where(np.isfinite(z), np.maximum(excess, 0.0), 0.0)
        return excess.max(axis=1) if excess.size else np.zeros(len(x)), excess > self._margin

    def unfamiliar_features(self, outside: npt.NDArray[np.bool_]) -> list[str]:
        return [self.contract.features[j].name for j in np.flatnonzero(outside).tolist()]

    def _run(self, z: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        parts = []
        for i in range(0, len(z), self.batch):
            out = self.session.run([self.contract.output_name], {self.contract.input_name: z[i : i + self.batch]})[0]
            parts.append(np.asarray(out, np.float64).reshape(len(z[i : i + self.batch]), -1))
        return np.concatenate(parts) if parts else np.zeros((0, len(self.contract.classes)))

    def score(self, x: npt.NDArray[np.float64]) -> ScoreBatch:
        n = len(x)
        x = np.array(x, np.float64, copy=True).reshape(n, -1)
        z, missing = self.normalise(x)
        present = np.isfinite(x) if x.size else np.zeros(x.shape, bool)
        scores = np.full(n, np.nan)
        labels = [""] * n
        lacking = (missing > self.contract.max_missing_fraction) | (~present[:, self._required]).any(axis=1)
        self.windows_skipped += int(lacking.sum())
        distance, outside = self.familiar(x)
        unfamiliar = ~lacking & outside.any(axis=1)
        outside[~unfamiliar] = False
        distance[lacking] = np.nan
        self.windows_unfamiliar += int(unfamiliar.sum())
        ok = ~lacking & ~unfamiliar
        if ok.any():
            probs = self._run(z[ok])
            s = 1.0 - probs[:, self._healthy]
            finite = np.isfinite(s) & np.isfinite(probs).all(axis=1)
            self.invalid_outputs += int((~finite).sum())
            s[~finite] = np.nan
            scores[ok] = np.clip(s, 0.0, 1.0)
            masked = probs.copy()
            masked[:, self._healthy] = -np.inf
            top = np.argmax(np.nan_to_num(masked, nan=-np.inf), axis=1)
            for k, i in enumerate(np.flatnonzero(ok).tolist()):
                labels[i] = self.contract.classes[int(top[k])] if finite[k] else ""
        scored = np.isfinite(scores)
        self.windows_scored += int(scored.sum())
        self.windows_degraded += int((scored & (missing > 0)).sum())
        return ScoreBatch(scores, labels, missing, scored, present, lacking, unfamiliar, outside, distance)

    def explain(self, x: npt.NDArray[np.float64], top: int = 3) -> list[tuple[str, float]]:
        """Occlusion: how much the score drops when each present feature is taken away — set to its training mean,
        and flagged missing if the model reads flags (one batched run). Features the window lacked are not named."""
        x = np.array(x, np.float64, copy=True).reshape(1, -1)
        f = x.shape[1]
        feats = np.flatnonzero(np.isfinite(x[0]))
        batch_x = np.repeat(x, len(feats) + 1, axis=0)
        batch_x[np.arange(1, len(feats) + 1), feats] = np.nan
        z, _ = self.normalise(batch_x)
        s = 1.0 - self._run(z)[:, self._healthy]
        contrib = np.full(f, np.nan)
        contrib[feats] = s[0] - s[1:]
        order = [int(i) for i in np.argsort(-np.nan_to_num(contrib, nan=-np.inf)) if np.isfinite(contrib[i])][:top]
        return [(self.contract.features[i].name, round(float(contrib[i]), 4)) for i in order]
