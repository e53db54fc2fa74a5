"""ablate — robustness studies of safety training in open-weight language models.

Stages (each a plain function and a CLI command): load a model (`ablate.models`), load prompt sets
(`ablate.data`), generate (`ablate.generation`), harden / attack by fine-tuning (`ablate.finetune`),
extract and ablate refusal directions (`ablate.directions`, `ablate.interventions`), evaluate
(`ablate.evaluate`), and run whole studies with reports (`ablate.study`, `ablate.report`).
"""

import os

__version__ = "0.1.0"

# Offline by default: no usage pings. Set before transformers, datasets or huggingface_hub is
# imported (they read these once); a user's own setting wins.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # huggingface_hub / transformers telemetry
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # datasets' download-count request on every load


class AblateError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback.

    Messages name the culprit (file, key, value) and what was expected.
    """
