r"""Converts torchvision WideResNet50-2 ImageNet weights into an orbax checkpoint.

    python -m launch.convert_weights \
        --torchvision=weights/wide_resnet50_2-32ee1156.pth --out=weights/wrn50_2_imagenet

The .pth is torchvision's file (``Wide_ResNet50_2_Weights.IMAGENET1K_V1`` or ``_V2``), fetched
once on a machine with internet access. Configs name the output folder as
``config.model.pretrained``.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from launch import cli
from wdam_jax.errors import MissingFileError
from wdam_jax.models import wide_resnet

_TORCHVISION = flags.DEFINE_string("torchvision", None, "torchvision wide_resnet50_2 .pth file.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the orbax checkpoint.")


def convert(torchvision_path: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """Reads a torchvision state_dict, checks it maps onto the Flax model, writes the checkpoint.

    ``out`` must be new, empty, or a previous conversion (replaced once the new one is complete);
    any other folder is refused untouched (see ``wide_resnet.save_pretrained``).
    """
    import torch  # The torch side of the conversion lives here, never in wdam_jax.

    path = pathlib.Path(torchvision_path)
    if not path.is_file():
        raise MissingFileError(
            f"{path} does not exist. Download torchvision's wide_resnet50_2 ImageNet weights "
            "(e.g. https://download.pytorch.org/models/wide_resnet50_2-32ee1156.pth) on a machine "
            "with internet access and pass its path with --torchvision."
        )
    wide_resnet.check_output_folder(out)  # Before the slow part, so a wrong --out fails at once.
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor files.
        raise ValueError(f"{path} is not a readable torch state_dict ({error}).") from error
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    model = wide_resnet.from_torchvision(state_dict)  # Validates every name and shape.
    out_dir = wide_resnet.save_pretrained(wide_resnet.to_torchvision(model), out)
    logging.info("Wrote %s from %s.", out_dir, path)
    return out_dir


def main(argv):
    del argv
    # Checked here rather than with flags.mark_flags_as_required, which would make every other
    # absl program that imports this module demand these flags too.
    if not _TORCHVISION.value or not _OUT.value:
        raise app.UsageError("Give both --torchvision=PATH.pth and --out=DIR.")
    convert(_TORCHVISION.value, _OUT.value)


if __name__ == "__main__":
    cli.run(main, config_flag=None)
