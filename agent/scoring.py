"""Feature rows → scores through one onnxruntime session, tuned for a small CPU.

Missing features (a sensor that went quiet) are imputed with the training mean — zero after normalisation — and
the row is marked degraded, as long as no more than the contract's `max_missing_fraction` of features is missing;
beyond that the window is not scored at all (counted), never scored on silent zeros. A non-finite model output
is never a score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.contract import Contract, ContractError, parse_contract


class ModelLoadError(ValueError):
    """A model file that onnxruntime cannot load."""


@dataclass(slots=True)
class ScoreBatch:
    scores: npt.NDArray[np.float64]  # NaN where not scored
    labels: list[str]  # most likely non-healthy class per row
    missing: npt.NDArray[np.float64]  # fraction of features missing per row
    scored: npt.NDArray[np.bool_]


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class Scorer:
    def __init__(
        self, session: ort.InferenceSession, contract: Contract, path: Path | None = None, batch: int = 16
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
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(contract.features)):
            raise ContractError(f"model input shape {shape} does not take {len(contract.features)} features")
        self._mean = np.asarray(contract.mean, np.float64)
        self._std = np.asarray(contract.std, np.float64)
        self._healthy = contract.classes.index(contract.healthy_class)
        self.windows_scored = 0
        self.windows_skipped = 0
        self.windows_degraded = 0
        self.invalid_outputs = 0

    @classmethod
    def load(cls, path: Path, threads: int = 1, batch: int = 16) -> Scorer:
        if not Path(path).is_file():
            raise ModelLoadError(f"{path}: no such model file")
        try:
            sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
        meta = sess.get_modelmeta().custom_metadata_map
        return cls(sess, parse_contract(meta), path, batch)

    def check_signals(self, available: set[str]) -> None:
        """Refuse a model that needs signals this vehicle cannot produce."""
        missing = [s for s in self.contract.signals if s not in available]
        if missing:
            raise ContractError(f"model needs signals this agent cannot decode: {', '.join(missing)}")

    def normalise(self, x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
        z = (x - self._mean) / self._std
        bad = ~np.isfinite(z)
        missing = bad.mean(axis=1) if z.size else np.zeros(len(x))
        z[bad] = 0.0
        return z.astype(np.float32), missing

    def _run(self, z: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        parts = []
        for i in range(0, len(z), self.batch):
            out = self.session.run([self.contract.output_name], {self.contract.input_name: z[i : i + self.batch]})[0]
            parts.append(np.asarray(out, np.float64).reshape(len(z[i : i + self.batch]), -1))
        return np.concatenate(parts) if parts else np.zeros((0, len(self.contract.classes)))

    def score(self, x: npt.NDArray[np.float64]) -> ScoreBatch:
        n = len(x)
        z, missing = self.normalise(np.array(x, np.float64, copy=True).reshape(n, -1))
        scores = np.full(n, np.nan)
        labels = [""] * n
        ok = missing <= self.contract.max_missing_fraction
        self.windows_skipped += int((~ok).sum())
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
        return ScoreBatch(scores, labels, missing, scored)

    def explain(self, x: npt.NDArray[np.float64], top: int = 3) -> list[tuple[str, float]]:
        """Occlusion: how much the score drops when each feature is set to its training mean (one batched run)."""
        z, _ = self.normalise(np.array(x, np.float64, copy=True).reshape(1, -1))
        f = z.shape[1]
        batch = np.repeat(z, f + 1, axis=0)
        batch[np.arange(1, f + 1), np.arange(f)] = 0.0
        s = 1.0 - self._run(batch)[:, self._healthy]
        contrib = s[0] - s[1:]
        order = np.argsort(-contrib)[:top]
        return [(self.contract.features[i].name, round(float(contrib[i]), 4)) for i in order if np.isfinite(contrib[i])]
