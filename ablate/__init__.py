"""ablate — robustness studies of safety training in open-weight language models.

Stages (each a plain function and a CLI command): load a model (`ablate.models`), load prompt sets
(`ablate.data`), generate (`ablate.generation`), harden / attack by fine-tuning (`ablate.finetune`),
extract and ablate refusal directions (`ablate.directions`, `ablate.interventions`), evaluate
(`ablate.evaluate`), and run whole studies with reports (`ablate.study`, `ablate.report`).
"""

__version__ = "0.1.0"


class AblateError(Exception):
    """A user-facing error: the CLI prints its message as one line, without a traceback.

    Messages name the culprit (file, key, value) and what was expected.
    """
