"""What a run prints: stage headers, one progress bar per step of work, the result table — nothing else.

The libraries underneath talk a lot by default. Each known source is quietened where it speaks, for
the duration of our call, never by a process-wide filter:

- the Trainer prints its raw log dict every logging step: `LossProgressCallback` replaces its progress
  bar with one that shows the loss on the bar instead;
- trl reads `model.is_gradient_checkpointing`, which transformers 5 marks as a FutureWarning:
  `known_warnings_silenced()` filters exactly that message around training;
- lm-eval logs a warning for a model passed in memory (what `ablate.evaluate.capability` does on
  purpose), runs `git describe` with its error output on the terminal, and shows three bars of its own
  per task (building contexts, tokenising, log-likelihoods): `quiet_lm_eval()`;
- trl prepares a training set in four `map` passes, each with a datasets bar: `quiet_datasets()`;
- loading a model shows a weight-loading bar, saving one a shard-writing bar, and datasets a bar per
  split it builds from a local file: `quiet_loading()` turns those off while a study runs (the study's
  own bars stay).

A warning that is not known stays visible, as one line (`warning: …`) instead of Python's two-line form
with a source line: `study_output()` puts these together around a study.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import warnings
from typing import Iterator

from transformers import ProgressCallback

# (category, message regex) of warnings that are known, harmless and not the user's to act on.
KNOWN_WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # trl reads the old name (transformers 5)
]


@contextlib.contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Inside the block, the `KNOWN_WARNINGS` (and only those) are not shown."""
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


class LossProgressCallback(ProgressCallback):
    """The Trainer's progress bar with the latest loss on it, in place of a printed dict per logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)


def quiet_trainer(trainer, progress: bool) -> None:
    """One progress bar with the loss (or none without `progress`), and no log dicts printed."""
    from transformers import PrinterCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what the Trainer prints instead of a bar when tqdm is off
    if progress:
        trainer.add_callback(LossProgressCallback())


def _git_hash_quietly() -> str | None:
    """lm-eval's `get_git_commit_hash` with git's complaint outside a repository kept off the terminal."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,
                                       text=True).strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


# lm-eval's modules that draw a tqdm bar for every task (contexts, tokenising, log-likelihood requests).
LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _no_bar(*args, **kwargs):
    """A tqdm that never draws (lm-eval passes `disable=` itself on some calls: this one wins)."""
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's warnings about a model passed in memory, its `git describe` error and its own bars, off."""
    import importlib
    from unittest import mock

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", _git_hash_quietly))
            for name in LM_EVAL_BAR_MODULES:
                module = importlib.import_module(name)
                if hasattr(module, "tqdm"):
                    stack.enter_context(mock.patch.object(module, "tqdm", _no_bar))
            yield
    finally:
        logger.setLevel(level)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    stream = file if file is not None else sys.stderr
    text = " ".join(str(message).split())
    try:
        stream.write(f"warning: {text}\n" if category is UserWarning else f"warning ({category.__name__}): {text}\n")
    except OSError:  # a closed or broken stream: a warning must never end the run
        pass


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Inside the block, every warning shown is one line, `warning: <message>`, without the source line."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line
        yield


@contextlib.contextmanager
def study_output() -> Iterator[None]:
    """What a study prints: no loading bars, the known harmless warnings off, any other warning one line."""
    with quiet_loading(), known_warnings_silenced(), one_line_warnings():
        yield


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No datasets bars (building a split from a file, each `map` pass) inside the block."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No weight-loading and shard-writing bars (transformers) and no datasets bars inside the block."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with quiet_datasets():
            yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()

