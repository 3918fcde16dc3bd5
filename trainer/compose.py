"""python -m trainer.compose: one model folder from stages trained apart.

The content and motion stages both read only the frozen encoder of stage 1, so they can train at the
same time in separate runs (``--init`` the same stage-1 folder, separate ``--out``). This joins the
autoencoder of one folder (e.g. a decoder fine-tune of stage 1), the content UNet of another and the
motion DiT of a third into one folder the engine loads. It refuses folders whose encoders differ, since
then the diffusion stages were trained on other content frames and motion latents than it would decode.

    python -m trainer.compose --autoencoder runs/ae/model --content runs/content/model \\
        --motion runs/motion/model --out my-model [--config default]
"""

import sys
from typing import List, Optional

import torch

from engine.atomic import check_output, output_lock
from engine.cli import Parser, run_main
from engine.configs import load_config
from engine.model_folder import check_model_folder
from engine.models import CMDModel


def _same_encoder(a, b) -> bool:
    pa = {n: p for m in a.encoder_modules() for n, p in m.named_parameters()}
    pb = {n: p for m in b.encoder_modules() for n, p in m.named_parameters()}
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def compose(autoencoder: str, content: str, motion: str, out: str, config: Optional[str] = None) -> CMDModel:
    """The model folder ``out`` from the autoencoder (and image VAE) of one folder, the content UNet of another
    and the motion DiT of a third. A one-line ValueError, before any weights load, for a folder with a missing
    or truncated file (:func:`engine.model_folder.check_model_folder`), an ``out`` that cannot be written or an
    unknown ``config``; after loading,
    for folders whose encoders differ."""
    folders = (autoencoder, content, motion)
    for folder in folders:
        check_model_folder(folder)
    check_output(out, folder=True)
    if config:
        load_config(config)
    ae_model, content_model, motion_model = (CMDModel.from_pretrained(p) for p in folders)
    for name, other in (("content", content_model), ("motion", motion_model)):
        if not _same_encoder(ae_model.autoencoder, other.autoencoder):
            raise ValueError(f"the {name} folder's encoder differs from that of {autoencoder!r}: "
                             "its stage was trained on other encodings")
    cfg = load_config(config) if config else content_model.config
    model = CMDModel(cfg, ae_model.autoencoder, motion_model.motion_dit, content_model.content_unet, ae_model.vae)
    with output_lock(out, "--out"):  # one writer at a time (another one refuses: OutputBusy)
        model.save_pretrained(out)
    return model


def main(argv: Optional[List[str]] = None) -> int:
    p = Parser(prog="python -m trainer.compose", description=__doc__.split("\n\n")[0])
    p.add_argument("--autoencoder", required=True, help="model folder whose autoencoder to take")
    p.add_argument("--content", required=True, help="model folder whose content UNet to take")
    p.add_argument("--motion", required=True, help="model folder whose motion DiT to take")
    p.add_argument("--out", required=True, help="the new model folder (written atomically)")
    p.add_argument("--config", help="config of the result (default: the content folder's)")

    def body() -> int:
        args = p.parse_args(argv)
        compose(args.autoencoder, args.content, args.motion, args.out, args.config)
        print(f"wrote {args.out}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
