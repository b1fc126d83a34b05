"""Training the demo model with PyTorch Lightning: the autoencoder, then the text-conditioned UNet."""
from ldm.training.trainers import AutoencoderTrainer, DiffusionTrainer, export_state_dict, merge_first_stage, train

__all__ = ["AutoencoderTrainer", "DiffusionTrainer", "export_state_dict", "merge_first_stage", "train"]
