"""What a fresh page of the web UI starts with: the pretrained built-in base toy-sd1 (docs/toy-model.md), drawn
the way its model card draws it, so the Train tab's samples and the Generate tab's images are real pictures.
The random-weight tiny-* models stay selectable (quick checks); these are only the starting values."""

from __future__ import annotations

from sd_loha.models import TOY_MODELS
from sd_loha.toy import evaluate as model_card

#: The base model both tabs start with (listed first in their model dropdowns).
DEFAULT_MODEL = next(iter(TOY_MODELS))
#: Its size in pixels, the only one it draws (16-latent UNet x 4 of the VAE); tests/webui/test_defaults.py checks it.
DEFAULT_SIZE = 64
#: Captions of its grammar `a {color} {shape} on a {background} background`: the only words it was trained on.
DEFAULT_PROMPTS = ("a red circle on a white background", "a blue square on a yellow background")
#: The model card's sampling: 20 Euler steps at guidance 4 (shapes right in 85 % of its prompt set; at 7 in 62 %).
DEFAULT_STEPS = model_card.STEPS
DEFAULT_GUIDANCE = model_card.GUIDANCE
DEFAULT_SAMPLER = "euler"
