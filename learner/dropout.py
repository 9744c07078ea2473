"""One module mode for every pass of a training step: the proximal, reference and update passes compute the same
function, so the first update's ratio pi_theta / pi_old is exactly 1.

Trial and error runs without dropout (what TRL's `disable_dropout` option does): dropout draws a new mask per
forward pass, so with it no two passes (proximal and update, learner and engine) would agree, and the ratio,
the off-policy weight and the KL would measure the masks. Imitation has no proximal pass and keeps the model's
dropout (`learner.lora.dropout` included). The model stays in train mode either way: transformers applies
gradient checkpointing only to modules in train mode.
"""

from __future__ import annotations

from torch import nn

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def train_mode(model: nn.Module, dropout: bool) -> None:
    """model.train(); without `dropout`, every dropout of it off: its dropout modules, and the attention modules'
    own (transformers' attention reads `attention_dropout` only while its module trains) in eval mode."""
    model.train()
    if dropout:
        return
    for module in model.modules():
        if isinstance(module, DROPOUTS) or isinstance(
            getattr(module, "attention_dropout", None), (int, float)
        ):
            module.eval()
