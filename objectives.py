"""The training objectives, by the name train.py's --objective takes. Each is one class with
the interface of loss.FlowMatching; removing one is deleting its file and its two lines here."""
from contrastive import PairedContrastive
from diffusion import Diffusion
from loss import FlowMatching
from meanflow import MeanFlow

OBJECTIVES = {
    "flow": FlowMatching,               # the paper's (SiT's): flow matching + the dispersive loss
    "diffusion": Diffusion,             # DiT's: DDPM noise prediction, DDIM sampling (diffusion.py)
    "meanflow": MeanFlow,               # one-step generation (meanflow.py)
    "contrastive": PairedContrastive,   # the paper's comparison: two views, positive pairs (contrastive.py)
}
