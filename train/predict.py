"""Use a trained estimator as users do: score the grasps of objects and pick the best ones.

`Estimator.scores(sdf, grasps)` scores candidate grasps of one SDF (for a grasp planner's loop).
`predict_scenes`, `predict_shards` and `predict_mesh` score whole datasets or one mesh and give one row
per grasp: `scene` (name), `grasp` (its index in the scene), `prediction`, and `score` when the labels
are known; `write_parquet` saves them and `best_grasps` picks each object's K best (lowest) predictions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gq.common.errors import UsageError
from gq.common.files import check_writable, write_atomically
from gq.common.ownership import check_file_replaceable
from gq.models import GRASP_DIM, GQEstimatorBase
from gq.pipeline import open_dataset, open_loader, resolve_device
from gq.shards.source import SCENE_FILE, list_scenes, read_npy, read_scene

from .checkpoint import Trained, load_model
from .metrics import Metrics
from .scores import Standardiser

GRASP_CHUNK = 8192  # grasps per forward pass of one SDF
TOOL = "predict"
OWNER_KEY = "gq.written_by"  # Parquet metadata key: which command wrote the file


class PredictError(UsageError):
    """Input that cannot be scored; `str()` names the file or value and what to do."""


@dataclass
class Predictions:
    """One row per grasp; `score` is NaN where the true score is unknown."""

    scene: np.ndarray  # object names (str)
    grasp: np.ndarray  # int32 index of the grasp in its scene
    prediction: np.ndarray  # float32 predicted score (lower is better)
    score: np.ndarray  # float32 true score, NaN when unknown

    @staticmethod
    def concat(parts: list[Predictions]) -> Predictions:
        return Predictions(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("scene", "grasp", "prediction", "score"))
        )

    @staticmethod
    def of_scene(name: str, prediction: np.ndarray, score: np.ndarray | None) -> Predictions:
        n = len(prediction)
        return Predictions(
            np.full(n, name, dtype=object),
            np.arange(n, dtype=np.int32),
            prediction.astype(np.float32),
            np.full(n, np.nan, np.float32) if score is None else score.astype(np.float32),
        )


class Estimator:
    """A trained model with its score units, ready to score grasps on a device.

    Made with `Estimator.load` from one of our checkpoints (which record the score statistics the model
    was trained with) or from a seed state_dict (which predicts raw scores).

    Args:
        model: A GQEstimator or GQEstimatorLarge.
        stats: The checkpoint's score statistics (`mean`, `std`), or None for a model of raw scores.
        device: Where the model runs ("cpu", "cuda", "auto").

    Example:
        ```python
        from gq.train.predict import Estimator

        est = Estimator.load("runs/a/best.pt", device="cuda")
        scores = est.scores(sdf, candidate_grasps)  # (N,) float32, lower is better
        best = candidate_grasps[scores.argmin()]
        ```
    """

    def __init__(self, model: GQEstimatorBase, stats: Trained | None, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.units = Standardiser.of_checkpoint(stats)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> Estimator:
        """From one of our checkpoints (best.pt, last.pt) or a seed state_dict (torch.compile'd ones too).

        Args:
            checkpoint: The checkpoint file.
            device: Where the model runs ("cpu", "cuda", "auto").

        Returns:
            The estimator, in eval mode on `device`.

        Raises:
            CheckpointError: The file is missing, is not a checkpoint, fails its CRC-32 check (damaged since it
                was written), holds NaN or inf, or its weights do not fit a model.
        """
        model, stats = load_model(checkpoint)
        return cls(model, stats, device)

    @property
    def grid(self) -> int:
        return self.model.input_size

    def check(self, sdf: np.ndarray, grasps: np.ndarray, where: str) -> None:
        """PredictError naming `where` unless sdf is (D,D,D) for this model and grasps are (N,19) (N >= 0), finite."""
        d = self.grid
        if sdf.shape != (d, d, d):
            raise PredictError(
                f"{where}: SDF of shape {sdf.shape}, the model reads ({d}, {d}, {d}); use data made at the model's grid"
            )
        if sdf.dtype.kind != "f" or not np.isfinite(sdf).all():
            raise PredictError(f"{where}: SDF of dtype {sdf.dtype} with non-finite or non-numeric values")
        check_grasps(grasps, where, allow_empty=True)

    @torch.no_grad()
    def scores(self, sdf: np.ndarray, grasps: np.ndarray) -> np.ndarray:
        """Predicted scores of candidate grasps on one object; the SDF is encoded once for all of them.

        Args:
            sdf: The object's (D, D, D) SDF in the training data's frame and scale (D: the model's grid).
            grasps: (N, 19) grasps in the same frame: position, quaternion xyzw, 12 joint angles.

        Returns:
            (N,) float32 predicted scores in score units; lower is better. Empty for no candidates (N = 0).

        Raises:
            PredictError: Shapes that do not fit the model, or non-finite values (naming the first bad grasp row).
        """
        sdf, grasps = np.asarray(sdf), np.asarray(grasps)
        self.check(sdf, grasps, "scores()")
        if not len(grasps):
            return np.empty(0, np.float32)
        # np.array copies: a scene read from a file is a read-only array, which torch does not take as it is
        x = torch.from_numpy(np.array(sdf, dtype=np.float32)).to(self.device)
        features = self.model.encode_sdf(x[None, None])
        g = torch.from_numpy(np.array(grasps, dtype=np.float32)).to(self.device)
        out = [
            self.model.score_features(features.expand(len(chunk), -1), chunk) for chunk in torch.split(g, GRASP_CHUNK)
        ]
        return self.units.decode(torch.cat(out).float()).cpu().numpy()


def check_grasps(grasps: np.ndarray, where: str, *, allow_empty: bool = False) -> None:
    """PredictError naming `where` (and the first bad row) unless `grasps` are (N,19) finite floating-point values,
    N >= 1 unless `allow_empty`."""
    if grasps.ndim != 2 or grasps.shape[1] != GRASP_DIM or (len(grasps) == 0 and not allow_empty):
        least = "" if allow_empty else " with N >= 1"
        raise PredictError(f"{where}: grasps of shape {grasps.shape}, expected (N, {GRASP_DIM}){least}")
    if grasps.dtype.kind != "f":
        raise PredictError(f"{where}: grasps of dtype {grasps.dtype}, expected floating-point values")
    bad = np.flatnonzero(~np.isfinite(grasps).all(axis=1))
    if len(bad):
        rows = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise PredictError(f"{where}: grasps row {bad[0]} holds NaN or inf{rows}; give finite grasps")


def check_mesh_max_extent(extent: float | None) -> None:
    """PredictError unless `extent` is None (the mesh's own) or a finite length > 0: it divides every coordinate."""
    if extent is not None and not (math.isfinite(extent) and extent > 0):
        raise PredictError(
            f"--mesh-max-extent {extent}: must be a finite length > 0 (the training data's mesh_max_extent.txt), "
            "or left out for the mesh's own extent"
        )


def predict_scenes(estimator: Estimator, scenes_dir: str | Path, progress: bool = False) -> Predictions:
    """Every `<name>/scene.npz` of a processed directory (the seed's layout); `scores` are optional there.

    Scenes are listed and read with make_shards' checks (`gq.shards.source`), and every one is checked
    before the first is scored: a bad file ends the command at once, not after the predictions.
    """
    root = Path(scenes_dir)
    if not root.is_dir():
        raise PredictError(f"--scenes {root}: not a directory")
    paths = {name: root / name / SCENE_FILE for name in list_scenes(root)}
    if not paths:
        raise PredictError(f"--scenes {root}: no <scene>/scene.npz inside")

    def read(path: Path) -> dict[str, np.ndarray]:
        return read_scene(path, grid=estimator.grid, required=("sdf", "grasps"), grid_of="the model's grid")

    for path in tqdm(paths.values(), unit="scene", desc="check", disable=not progress or None):
        read(path)
    parts = []
    for name, path in tqdm(paths.items(), unit="scene", desc="predict", disable=not progress or None):
        arrays = read(path)
        scores = estimator.scores(arrays["sdf"], arrays["grasps"])
        parts.append(Predictions.of_scene(name, scores, arrays.get("scores")))
    return Predictions.concat(parts)


def _grasp_indices(batch_grasps: np.ndarray, stored: np.ndarray, where: str) -> np.ndarray:
    """For each row of `batch_grasps`, its row in `stored` (the same rows in another order)."""
    a = np.lexsort(batch_grasps.T[::-1])
    b = np.lexsort(stored.T[::-1])
    if len(a) != len(b) or not np.array_equal(batch_grasps[a], stored[b]):
        raise PredictError(f"{where}: the loader's grasps are not the scene's stored grasps; verify the dataset")
    index = np.empty(len(a), dtype=np.int64)
    index[a] = b
    return index


@torch.no_grad()
def predict_shards(
    estimator: Estimator,
    shards_dir: str | Path,
    *,
    split: str,
    scenes_per_batch: int = 8,
    loader: str = "cache",
    cache_dir: str | Path | None = None,
    cache_limit: int | str | None = None,
) -> Predictions:
    """Every scene of one split of a shard dataset (a directory or a URL, read through the shard cache in
    `cache_dir`), whole scenes per batch (the epoch plan shuffles each scene's grasps, so rows are matched back to
    their stored order, read from the scene's shard, held local while it is read)."""
    # Read and quick-verified once: the grid check, the loader, the labels.
    dataset = open_dataset(shards_dir, cache_dir=cache_dir, cache_limit=cache_limit)
    reader = dataset.reader
    if reader.layout.grid != estimator.grid:
        raise PredictError(f"--shards {shards_dir}: grid {reader.layout.grid}, the model reads {estimator.grid}")
    parts = []
    with (
        open_loader(
            dataset,
            mode=loader,
            split=split,
            scenes_per_batch=scenes_per_batch,
            grasps_per_sdf=reader.layout.max_grasps,
            seed=0,
            device=estimator.device,
            progress=False,
        ) as data,
        contextlib.closing(dataset.lease(1)) as stored,
    ):
        for batch in data:
            pred = estimator.units.decode(estimator.model(batch.sdf, batch.grasps, batch.scene_of_grasp).float())
            pred, grasps = pred.cpu().numpy(), batch.grasps.cpu().numpy()
            owner = batch.scene_of_grasp.cpu().numpy()
            for s, scene in enumerate(batch.scene_ids.tolist()):
                rows = np.flatnonzero(owner == s)
                shard = reader.locate(scene)[0]
                stored.acquire([shard])
                labels = np.array(reader.labels(scene))  # a copy: the file may leave the cache once released
                stored.release([shard])
                name = str(reader.column("name", [scene])[0])
                index = _grasp_indices(grasps[rows], np.asarray(labels[:, :GRASP_DIM]), f"{shards_dir} scene {name}")
                ordered = np.empty(len(rows), np.float32)
                ordered[index] = pred[rows]
                parts.append(Predictions.of_scene(name, ordered, np.asarray(labels[:, GRASP_DIM])))
    order = np.argsort([p.scene[0] for p in parts], kind="stable")  # by name, whatever the plan's order
    return Predictions.concat([parts[i] for i in order])


def predict_mesh(
    estimator: Estimator,
    mesh_path: str | Path,
    *,
    grasps_path: str | Path,
    mesh_max_extent: float | None = None,
    open_meshes: str = "refuse",
    sdf_backend: str = "mesh2sdf",
) -> Predictions:
    """One mesh (any trimesh format) and grasps (N,19) .npy in the mesh's frame, prepared as the seed's
    importer does: translation = bounds centre, scale = 2 / mesh_max_extent (default: this mesh's own
    largest extent; pass the training data's, from its mesh_max_extent.txt, to match its scale), its SDF by
    `sdf_backend` (gq.meshes.mesh_sdf: the one that made the training data, for the same SDF)."""
    from gq.meshes import MeshError, is_closed, load_mesh, mesh_sdf
    from gq.meshes.sdf import check_backend

    check_mesh_max_extent(mesh_max_extent)
    try:
        check_backend(sdf_backend, open_meshes)
    except ValueError as err:
        raise PredictError(str(err)) from None
    grasps = read_npy(Path(grasps_path), key="grasps")
    check_grasps(grasps, str(grasps_path))
    try:
        mesh = load_mesh(mesh_path)
    except MeshError as err:
        raise PredictError(str(err)) from None
    extent = float(mesh.extents.max()) if mesh_max_extent is None else mesh_max_extent
    if mesh.extents.max() > extent:
        raise PredictError(f"{mesh_path}: extent {mesh.extents.max():.6g} exceeds --mesh-max-extent {extent:.6g}")
    translation, scale = mesh.bounds.mean(axis=0), 2.0 / extent
    try:
        sdf = mesh_sdf(
            (mesh.vertices - translation) * scale,
            mesh.faces,
            estimator.grid,
            closed=is_closed(mesh),
            open_meshes=open_meshes,
            backend=sdf_backend,
        )
    except ValueError as err:
        raise PredictError(f"{mesh_path}: {err}") from None
    estimator.check(sdf, grasps, str(grasps_path))
    grasps = grasps.astype(np.float32)
    grasps[:, :3] = (grasps[:, :3] - translation) * scale
    return Predictions.of_scene(Path(mesh_path).stem, estimator.scores(sdf, grasps), None)


def write_parquet(predictions: Predictions, path: str | Path) -> None:
    """Columns scene, grasp, prediction, and score when any is known; written to a temporary file and renamed."""
    import pyarrow as pa  # here, not above: an Estimator inside a planner never loads pyarrow
    import pyarrow.parquet as pq

    path = Path(path)
    columns = {
        "scene": pa.array(predictions.scene.astype(str)),
        "grasp": pa.array(predictions.grasp),
        "prediction": pa.array(predictions.prediction),
    }
    if not np.isnan(predictions.score).all():
        columns["score"] = pa.array(predictions.score, mask=np.isnan(predictions.score))
    table = pa.table(columns).replace_schema_metadata({OWNER_KEY: TOOL})  # the file's ownership record
    write_atomically(path, lambda f: pq.write_table(table, f))


def written_by(path: Path) -> str | None:
    """The tool that wrote a predictions file: its Parquet metadata says; None for anything else (not Parquet, no
    such key: a file without the record is never replaced, whatever its columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
    owner = (schema.metadata or {}).get(OWNER_KEY.encode())
    return None if owner is None else owner.decode(errors="replace")


def check_out(path: Path, *, overwrite: bool) -> None:
    """`--out` may be written: its folder exists and takes files, and it is absent, or a predictions file of ours
    with `overwrite` (gq.common.ownership). Checked before any work; predict makes no folder."""
    if not path.parent.is_dir():
        raise PredictError(f"--out {path}: no folder {path.parent} to write it in; create it or choose another --out")
    check_writable(path, flag="--out")
    check_file_replaceable(path, tool=TOOL, overwrite=overwrite, written_by=written_by, kind="Parquet file")


def best_grasps(predictions: Predictions, k: int) -> list[tuple[str, int, int, float, float]]:
    """Each object's k best grasps by prediction (lowest first): (scene, rank, grasp, prediction, score)."""
    order = np.lexsort((predictions.grasp, predictions.prediction, predictions.scene.astype(str)))
    rows, seen = [], {}
    for i in order:
        name = str(predictions.scene[i])
        rank = seen.get(name, 0)
        if rank < k:
            rows.append(
                (
                    name,
                    rank + 1,
                    int(predictions.grasp[i]),
                    float(predictions.prediction[i]),
                    float(predictions.score[i]),
                )
            )
        seen[name] = rank + 1
    return rows


def ranking_metrics(predictions: Predictions) -> dict[str, float] | None:
    """The per-object metrics of train.metrics over the scenes whose true scores are known, or None."""
    known = ~np.isnan(predictions.score)
    if not known.any():
        return None
    _, groups = np.unique(predictions.scene[known].astype(str), return_inverse=True)
    metrics = Metrics(torch.device("cpu"))
    metrics.add(
        torch.from_numpy(predictions.prediction[known]),
        torch.from_numpy(predictions.score[known]),
        torch.from_numpy(groups.astype(np.int64)),
        int(groups.max()) + 1,
    )
    return metrics.result(baseline=float("nan"), prefix="")
