"""Train the small lung-segmentation model behind the recipe's lung crop, check it, export it to
ONNX (INT8 if it holds) with its own record, and look at where it fails:

    python -m xray_edge.train.lungs ../shared/data/cxr3-extra --out train/lungs \\
        --check ../shared/data/cxr3 ../shared/data/cxr3-extra

(``--check-only``: check the model already in ``--out``, without training.)

Training data: the lung masks that come with the data root (``masks.csv``: mask, image), adult
normal PA radiographs only. A U-Net (4 levels, 16-128 filters) at 128 x 128, Dice + cross-entropy,
paired geometric augmentation and the ``processing`` augmentation's imaging steps on the image.
``--check`` runs the model on every image of other roots and reports, per origin and class, how
often it finds two plausible lung fields (children's images and dense consolidation are where
masks learned on normal adults can fail) and how often the crop box is smaller than the reduced
decoding allows for (``preprocess.LUNG_BOX_MIN_SIDE``), with a contact sheet of examples.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xray_edge.recipe import LungCrop
from xray_edge.decode import read_image
from xray_edge.lungs import LUNG_RECORD_KEY, box_of, lung_mask, model_input
from xray_edge.preprocess import LUNG_BOX_MIN_SIDE
from xray_edge.train import augment

SIZE = 128
FILE = "xray-edge-lungseg-int8.onnx"
PLAUSIBLE_AREA = (0.12, 0.75)  # share of the image a pair of lungs covers


def load_pairs(root: Path, size: int = SIZE) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Images in [0, 1] at their own resolution, masks (N, size, size) bool, image names."""
    rows = list(csv.DictReader((root / "masks.csv").open(newline="")))
    grey = [read_image(root / r["image"]) for r in rows]
    masks = [read_image(root / r["mask"]) > 0.5 for r in rows]
    import cv2

    masks = [cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
    return grey, np.stack(masks), [r["image"] for r in rows]


def paired_view(grey: np.ndarray, mask: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (model input, mask) pair: the same random affine on both, then imaging steps."""
    import cv2

    h, w = grey.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-10, 10), rng.uniform(0.8, 1.15))
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * (w, h)
    img = cv2.warpAffine(grey.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    big = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    big = cv2.warpAffine(big, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)
    img = augment.imaging(np.clip(img, 0, 1), rng)
    small = cv2.resize(big, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return model_input(img, size), small


def build_unet(size: int = SIZE, widths: Sequence[int] = (16, 32, 64, 128), seed: int = 0) -> Any:
    """image (N, size, size, 1) -> lung probability (N, size, size, 1)."""
    import keras

    init = keras.initializers.HeNormal(seed)

    def block(x, n):
        for _ in range(2):
            x = keras.layers.Conv2D(n, 3, padding="same", activation="relu", kernel_initializer=init)(x)
        return x

    inp = keras.Input((size, size, 1), name="image")
    skips, x = [], inp
    for n in widths[:-1]:
        x = block(x, n)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = block(x, widths[-1])
    for n, skip in zip(reversed(widths[:-1]), reversed(skips)):
        x = keras.layers.UpSampling2D(2)(x)
        x = block(keras.layers.Concatenate()([x, skip]), n)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="lungs")(x)
    return keras.Model(inp, out, name="lungseg")


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of bool masks."""
    inter = (pred & truth).reshape(len(pred), -1).sum(1)
    return 2 * inter / np.maximum(pred.reshape(len(pred), -1).sum(1) + truth.reshape(len(truth), -1).sum(1), 1)


def train(root: Path, out: Path, seed: int = 0, epochs: int = 30, views: int = 4) -> dict[str, Any]:
    """Train, check and export the lung model into ``out``; returns its figures."""
    import keras
    import tensorflow as tf

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    grey, masks, names = load_pairs(root)
    order = np.random.default_rng(seed).permutation(len(grey))
    n_val = len(grey) // 5
    val, tr = order[:n_val], order[n_val:]
    rng = np.random.default_rng(seed + 1)
    pairs = [paired_view(grey[i], masks[i], rng, SIZE) for i in tr for _ in range(views)]
    x_train = np.stack([p[0] for p in pairs])
    y_train = np.stack([p[1] for p in pairs]).astype(np.float32)[..., None]
    x_val = np.stack([model_input(grey[i], SIZE) for i in val])
    y_val = masks[val].astype(np.float32)[..., None]

    def loss(y, p):
        inter = tf.reduce_sum(y * p, axis=[1, 2, 3])
        soft_dice = 1 - (2 * inter + 1) / (tf.reduce_sum(y + p, axis=[1, 2, 3]) + 1)
        return keras.losses.binary_crossentropy(y, p, axis=[1, 2, 3]) + soft_dice

    model = build_unet(seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=6, restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs, batch_size=16,
                        callbacks=[stop], shuffle=True, verbose=2).history
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "lungseg.keras")
    fp32_val = dice(model.predict(x_val, verbose=0)[..., 0] >= 0.5, masks[val])
    int8_path, figures = export(model, x_train[:: views][:64], x_val, masks[val], out)
    figures |= {"train_images": int(len(tr)), "val_images": int(n_val), "views_per_image": views,
                "epochs_run": len(history["loss"]), "val_dice_keras_fp32": float(fp32_val.mean()),
                "seconds": round(time.perf_counter() - start, 1), "data": str(root), "seed": seed}
    (out / "metrics.json").write_text(json.dumps(figures, indent=2))
    return figures


def export(model: Any, calibration: np.ndarray, x_val: np.ndarray, m_val: np.ndarray, out: Path) -> tuple[Path, dict]:
    """FP32 ONNX (checked against Keras) and static INT8, the INT8 one kept if its validation Dice
    is within 0.01 of FP32's; writes it with its record to ``out / FILE``."""
    import onnx

    from xray_edge.export.convert import name_batch_dim, onnx_outputs
    from xray_edge.export.quantize import to_int8
    from xray_edge.train.model import to_onnx

    fp32 = to_onnx(model, names=None)
    name_batch_dim(fp32)
    onnx.save(fp32, str(out / "lungseg-fp32.onnx"))
    keras_p = model.predict(x_val, verbose=0)
    onnx_p = next(iter(onnx_outputs(fp32, x_val).values()))
    settings = to_int8(out / "lungseg-fp32.onnx", out / FILE, calibration, "minmax", op_types=("Conv", "MaxPool"))
    int8_p = next(iter(onnx_outputs(out / FILE, x_val).values()))
    d32, d8 = (float(dice(p[..., 0] >= 0.5, m_val).mean()) for p in (onnx_p, int8_p))
    figures = {"onnx_fp32_max_abs_diff": float(np.abs(keras_p - onnx_p).max()), "val_dice_onnx_fp32": d32,
               "val_dice_onnx_int8": d8, "quantization": settings}
    chosen = out / FILE
    if d32 - d8 > 0.01:
        chosen = out / FILE.replace("int8", "fp32")
        (out / "lungseg-fp32.onnx").replace(chosen)
    figures["file"] = chosen.name
    proto = onnx.load(str(chosen))
    entry = proto.metadata_props.add()
    entry.key, entry.value = LUNG_RECORD_KEY, json.dumps({
        "schema": "xray-edge/lung-record", "input": "image (N, 128, 128, 1) grey in [0, 1]: area resize, "
        "percentile stretch 0.5-99.5", "output": "lung probability (N, 128, 128, 1)", "size": SIZE,
        "training": "OpenIST chest X-ray lung masks (cxr3-extra/masks): 274 normal adult PA radiographs",
        "val_dice": d8 if chosen.name == FILE else d32, "licence": "research use only (mask source licence unverified)"})
    onnx.save(proto, str(chosen))
    return chosen, figures


def spec_for(path: Path) -> LungCrop:
    """The contract's lung-crop entry for the lung model file at ``path``."""
    from xray_edge.contract import sha256_file

    return LungCrop(model=path.name, sha256=sha256_file(path), size=SIZE)


def installed_spec() -> LungCrop:
    """The lung-crop entry of the lung model installed in xray_edge.models (``--install``)."""
    from xray_edge.lungs import model_path

    path = model_path(LungCrop(model=FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no lung model installed; train one with python -m xray_edge.train.lungs "
                                "ROOT --install")
    return spec_for(path)


def check(path: Path, roots: Sequence[Path], out: Path, per_cell: int = 6, seed: int = 0) -> dict[str, Any]:
    """How often the lung model finds two plausible lung fields, and a box whose shorter side is
    under LUNG_BOX_MIN_SIDE of the image's, per origin and class, on every image of ``roots``; a
    contact sheet of random examples (box drawn) per origin and class."""
    import cv2

    from xray_edge.lungs import _session
    from xray_edge.train.data import list_images

    spec = spec_for(path)
    session = _session(str(path), spec.sha256, spec.size)
    images, _ = list_images(roots)
    stats: dict[str, dict[str, list]] = {}
    rng = np.random.default_rng(seed)
    sheet_rows = {}
    for im in images:
        grey = read_image(im.path)
        probs = session.run(None, {session.get_inputs()[0].name: model_input(grey, SIZE)[None]})[0][0, :, :, 0]
        mask = lung_mask(probs, spec.threshold)
        n_regions = cv2.connectedComponents(mask.astype(np.uint8))[0] - 1
        plausible = n_regions == 2 and PLAUSIBLE_AREA[0] <= mask.mean() <= PLAUSIBLE_AREA[1]
        key = f"{im.origin} {im.label}"
        box = box_of(mask, grey.shape, spec)
        stats.setdefault(key, {"plausible": [], "area": [], "small": []})
        stats[key]["plausible"].append(plausible)
        stats[key]["area"].append(float(mask.mean()))
        stats[key]["small"].append(box is not None and min((box[1] - box[0]) / grey.shape[0],
                                                           (box[3] - box[2]) / grey.shape[1]) < LUNG_BOX_MIN_SIDE)
        if rng.random() < 0.05 and len(sheet_rows.setdefault(key, [])) < per_cell:
            tile = cv2.cvtColor(np.round(cv2.resize(grey, (160, 160)) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            edge = cv2.resize(mask.astype(np.uint8), (160, 160), interpolation=cv2.INTER_NEAREST)
            tile[cv2.dilate(edge, np.ones((3, 3), np.uint8)) > edge] = (0, 200, 255)
            box = box_of(mask, (160, 160), spec)
            if box:
                cv2.rectangle(tile, (box[2], box[0]), (box[3] - 1, box[1] - 1), (0, 255, 0), 1)
            cv2.putText(tile, key, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
            sheet_rows[key].append(tile)
    rows = [np.hstack(t + [np.zeros_like(t[0])] * (per_cell - len(t))) for t in sheet_rows.values() if t]
    if rows:
        cv2.imwrite(str(out / "check.png"), np.vstack(rows))
    report = {k: {"n": len(v["plausible"]), "plausible_rate": float(np.mean(v["plausible"])),
                  "median_area": float(np.median(v["area"])), "small_box_rate": float(np.mean(v["small"]))}
              for k, v in sorted(stats.items())}
    (out / "check.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xray_edge.train.lungs", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="data root with masks.csv")
    parser.add_argument("--out", type=Path, default=Path("runs/lungs"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="data roots to check the model on")
    parser.add_argument("--check-only", action="store_true", help="check the model already in --out; no training")
    parser.add_argument("--install", action="store_true",
                        help="copy the model into xray_edge.models, where a lung-crop recipe finds it")
    args = parser.parse_args(argv)
    if not args.check_only:
        print(json.dumps(train(args.root, args.out, args.seed, args.epochs), indent=2))
    chosen = args.out / json.loads((args.out / "metrics.json").read_text())["file"]  # INT8, or FP32 if INT8 lost Dice
    if args.install:
        import shutil

        from xray_edge.lungs import model_path

        shutil.copyfile(chosen, model_path(LungCrop(model=FILE)))
    if args.check:
        for key, value in check(chosen, args.check, args.out).items():
            print(f"{key}: {value['plausible_rate']:.1%} plausible of {value['n']}, median area "
                  f"{value['median_area']:.2f}, box under {LUNG_BOX_MIN_SIDE:.0%} of the side {value['small_box_rate']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
