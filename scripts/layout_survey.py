"""Which taps of timm models the monitors can tell the feature axis of (``docs/capture.md``, "which axis holds the
features").

For each model: one forward pass of a random image in eval mode, and for every ``@blocks``, ``@activations`` and
``@penultimate`` tap the shape it gives and the axis :func:`lightning_act.capture.layout.feature_axis` reads as the
features. Prints per model the taps of 4 or more axes whose layout nothing tells (``MassiveActivations``,
``DimensionalCollapse`` and ``SensitiveNeurons`` warn once for each and read them as ``(B, C, H, W)``), and those read
channels-last. Random weights, no download.

    OMP_NUM_THREADS=2 python scripts/layout_survey.py                          # the default list
    OMP_NUM_THREADS=2 python scripts/layout_survey.py --models swin_tiny_patch4_window7_224,resnet18
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace

import timm
import torch

from lightning_act.capture import module_chain, select_taps, unmatched_specs
from lightning_act.capture.layout import feature_axis, module_layout

MODELS = (
    "resnet18,resnet50,efficientnet_b0,mobilenetv3_small_100,convnext_tiny,convnext_atto,regnety_002,densenet121,"
    "swin_tiny_patch4_window7_224,swinv2_tiny_window8_256,mambaout_femto,tiny_vit_5m_224,maxvit_tiny_tf_224,"
    "coatnet_0_rw_224,gcvit_xxtiny,sequencer2d_s,nest_tiny,poolformer_s12,edgenext_xx_small,levit_128s,"
    "vit_tiny_patch16_224,efficientformer_l1,ghostnet_100,inception_v3,vgg11,mixer_b16_224,convmixer_768_32,"
    "hiera_tiny_224,davit_tiny,focalnet_tiny_srf,fastvit_t8,repvit_m1,efficientvit_b0,caformer_s18,cs3darknet_s,"
    "sebotnet33ts_256,hrnet_w18_small,dla34,xception41"
)
PRESETS = ("@blocks", "@activations", "@penultimate")


def survey(name: str) -> tuple[dict[str, tuple[tuple[int, ...], int | None]], set[str]]:
    """``{tap: (shape, feature axis or None)}`` of one forward pass, and the names of the ``@blocks`` taps."""
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    specs = [spec for spec in PRESETS if not unmatched_specs(model, [spec])]
    seen: dict[str, tuple[tuple[int, ...], int | None]] = {}
    for spec in specs:
        for tap in select_taps(model, spec):
            layout = replace(module_layout(module_chain(model, tap.module), tap.point), reads_features=True)

            def keep(x: object, name: str = tap.name, layout=layout) -> None:
                if isinstance(x, torch.Tensor) and name not in seen:
                    seen[name] = (tuple(x.shape), feature_axis(x.shape, layout) if x.dim() >= 3 else x.dim() - 1)

            if tap.point == "input":
                tap.module.register_forward_pre_hook(lambda module, args, keep=keep: keep(args[0] if args else None))
            else:
                tap.module.register_forward_hook(lambda module, args, output, keep=keep: keep(output))
    with torch.no_grad():
        model(torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224))))
    blocks = {tap.name for tap in select_taps(model, "@blocks")} if "@blocks" in specs else set()
    return seen, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated timm model names")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("model | taps | 4-D+ unknown (of them blocks) | read channels-last | first unknown")
    for name in args.models.split(","):
        seen, blocks = survey(name)
        unknown = [tap for tap, (shape, axis) in seen.items() if len(shape) >= 4 and axis is None]
        last = [tap for tap, (shape, axis) in seen.items() if len(shape) >= 4 and axis == len(shape) - 1]
        first = f"{unknown[0]} {seen[unknown[0]][0]}" if unknown else ""
        blocks_unknown = sum(tap in blocks for tap in unknown)
        print(f"{name} | {len(seen)} | {len(unknown)} ({blocks_unknown}) | {len(last)} | {first}")


if __name__ == "__main__":
    main()
