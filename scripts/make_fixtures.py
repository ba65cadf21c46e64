"""Export the fixture detectors used by the tests, one per supported family and layout.

Real exports with real exporters, random weights (no weights can be downloaded here), narrowed
to width 1/16 so the committed files stay small while the graph keeps every op of the real
architecture. Seeds are fixed; re-running reproduces the same files up to exporter versions.

  tests/fixtures/v8-t160-op11.onnx     Ultralytics yolov8.yaml, static 160, opset 11
  tests/fixtures/v8-dyn-op17.onnx      Ultralytics yolov8.yaml, dynamic batch/height/width, opset 17
  tests/fixtures/y11-t160-op13.onnx    Ultralytics yolo11.yaml, static 160, opset 13
  tests/fixtures/y26-t160-op18.onnx    Ultralytics yolo26.yaml, static 160, opset 18 (end-to-end head)
  tests/fixtures/y26-o2m-t160-op17.onnx  yolo26.yaml exported one-to-many (default nms=None)
  tests/fixtures/v10-t160-op17.onnx    Ultralytics yolov10n.yaml, static 160 (end-to-end head)
  tests/fixtures/v5-t160-op12.onnx     ultralytics/yolov5 (pip yolov5==7.0.14) yolov5n.yaml, opset 12
  tests/fixtures/yolox-t160-op11.onnx  YOLOX (yolox==0.3.0 sources) nano-style, decode_in_inference=False
  tests/fixtures/not-a-detector.onnx   a valid ONNX image model whose output is [1, 3]
"""
import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests/fixtures"
NAMES = {0: "tree", 1: "bush", 2: "dead tree"}
WIDTH = 0.0625


def calibration_batch(imgsz: int, bgr255=False):
    """Real photos (scikit-image samples) as a training batch, in the model's input convention."""
    import numpy as np
    from PIL import Image
    from skimage import data

    imgs = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    xs = []
    for im in imgs:
        a = np.asarray(Image.fromarray(im).resize((imgsz, imgsz), Image.BILINEAR), np.float32)
        a = a[:, :, ::-1] if bgr255 else a / 255.0
        xs.append(torch.from_numpy(a.copy()).permute(2, 0, 1))
    return torch.stack(xs)


def calibrate_bn(module: torch.nn.Module, batch):
    """Data-dependent init: sets every BatchNorm's statistics from real images, so activations
    neither vanish nor explode through the untrained net and outputs depend on the input (with
    the default init, a narrowed net emits nearly the same values for any image)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration passes
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    # Only the BatchNorms run in training mode: heads keep their inference path (YOLOX's
    # training forward needs targets).
    module.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for _ in range(2):
            module(batch)
    module.eval()


def build_ultralytics(cfg: str, imgsz=160):
    """The narrowed, BN-calibrated Ultralytics model of a fixture (deterministic: seed 0)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    torch.manual_seed(0)
    d = copy.deepcopy(yaml_model_load(cfg))
    d["nc"] = len(NAMES)
    depth = d["scales"]["n"][0]
    d["scales"] = {"n": [depth, WIDTH, 1024]}
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"{Path(cfg).stem.rstrip('n')}n.yaml"
        p.write_text(yaml.safe_dump(d))
        model = YOLO(str(p))
    model.model.names = dict(NAMES)
    calibrate_bn(model.model, calibration_batch(imgsz))
    return model


def export_ultralytics(model, out: Path, opset: int, imgsz=160, dynamic=False, **export_kw):
    f = model.export(format="onnx", imgsz=imgsz, opset=opset, dynamic=dynamic, simplify=True, **export_kw)
    Path(f).replace(out)
    print("wrote", out)


def ultralytics_fixture(cfg: str, out: str, opset: int, dynamic=False, imgsz=160, **export_kw):
    export_ultralytics(build_ultralytics(cfg, imgsz), FIX / out, opset, imgsz, dynamic, **export_kw)


def yolov5_fixture(out: str, opset=12, imgsz=160):
    import yolov5
    from yolov5.models.yolo import Detect, Model

    torch.manual_seed(0)
    cfg = Path(yolov5.__file__).parent / "models/yolov5n.yaml"
    d = yaml.safe_load(cfg.read_text())
    d["width_multiple"] = WIDTH
    d["nc"] = len(NAMES)
    model = Model(d)
    calibrate_bn(model, calibration_batch(imgsz))
    model.names = [NAMES[i] for i in range(len(NAMES))]
    # As yolov5/export.py does for ONNX: Detect emits decoded boxes.
    for m in model.modules():
        if isinstance(m, Detect):
            m.inplace = False
            m.dynamic = False
            m.export = True
    im = torch.zeros(1, 3, imgsz, imgsz)
    for _ in range(2):
        model(im)
    f = FIX / out
    torch.onnx.export(model, im, str(f), opset_version=opset, input_names=["images"],
                      output_names=["output0"], do_constant_folding=True, dynamo=False)
    import onnx

    m = onnx.load(str(f))
    for k, v in {"stride": int(max(model.stride)), "names": {i: n for i, n in enumerate(model.names)}}.items():
        meta = m.metadata_props.add()
        meta.key, meta.value = k, str(v)
    onnx.save(m, str(f))
    print("wrote", f)


def yolox_fixture(out: str, opset=11, imgsz=160):
    venv_src = Path(sys.prefix) / "src/yolox-0.3.0"
    sys.path.insert(0, str(venv_src))
    from yolox.models import YOLOPAFPN, YOLOX, YOLOXHead

    torch.manual_seed(0)
    # yolox-nano is depth 0.33 width 0.25 with depthwise convs; narrowed here.
    in_channels = [256, 512, 1024]
    backbone = YOLOPAFPN(0.33, WIDTH * 2, in_channels=in_channels, depthwise=True)
    head = YOLOXHead(len(NAMES), WIDTH * 2, in_channels=in_channels, depthwise=True)
    model = YOLOX(backbone, head)
    calibrate_bn(model, calibration_batch(imgsz, bgr255=True))
    model.head.decode_in_inference = False  # as tools/export_onnx.py does
    im = torch.zeros(1, 3, imgsz, imgsz)
    f = FIX / out
    torch.onnx.export(model, im, str(f), opset_version=opset, input_names=["images"],
                      output_names=["output"], do_constant_folding=True, dynamo=False)
    print("wrote", f)


def non_detector_fixture(out: str):
    """A valid ONNX image model that is not a detector (global average pool to [1, 3])."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["output0"])],
        "not_a_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    onnx.save(m, str(FIX / out))
    print("wrote", FIX / out)


def main():
    FIX.mkdir(parents=True, exist_ok=True)
    ultralytics_fixture("yolov8n.yaml", "v8-t160-op11.onnx", opset=11)
    ultralytics_fixture("yolov8n.yaml", "v8-dyn-op17.onnx", opset=17, dynamic=True)
    ultralytics_fixture("yolo11n.yaml", "y11-t160-op13.onnx", opset=13)
    # nms=False asks for the NMS-free (end-to-end) head; the default (nms=None) exports one-to-many.
    ultralytics_fixture("yolo26n.yaml", "y26-t160-op18.onnx", opset=18, nms=False)
    ultralytics_fixture("yolo26n.yaml", "y26-o2m-t160-op17.onnx", opset=17)
    ultralytics_fixture("yolov10n.yaml", "v10-t160-op17.onnx", opset=17, nms=False)
    yolov5_fixture("v5-t160-op12.onnx")
    yolox_fixture("yolox-t160-op11.onnx")
    non_detector_fixture("not-a-detector.onnx")


if __name__ == "__main__":
    main()
