"""Refusal-direction commands: `ablate direction` (extract and select) and `ablate abliterate` (bake it into the weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ablate import AblateError
from ablate.cli.app import app, console, model_config_from_options, overwrite_option, stdout


@app.command()
def direction(
    model: str = typer.Argument(..., help="Model spec: 'embedded', hub id, directory or .gguf file."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for candidates, sweep, figure and the selected direction."),
    refusal: Optional[str] = typer.Option(None, "--refusal", help="Refusal prompt set for the train means (default refusal:train)."),
    harmless: Optional[str] = typer.Option(None, "--harmless", help="Harmless prompt set for the train means (default harmless:train)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="DirectionConfig YAML (see docs/directions.md)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A shipped DirectionConfig instead of --config: 'arditi2024' (the paper's method, no learned strength)."),
    override: Optional[list[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable), e.g. --set kl_max=0.3."),
    device: str = typer.Option("auto", help="Device: auto, cpu, cuda, mps."),
    overwrite: bool = overwrite_option("--out"),
    quantization: str = typer.Option("none", help="Load the weights quantised by bitsandbytes: none, 8bit or 4bit."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Shard the model: auto, balanced, sequential or one device."),
) -> None:
    """Extract refusal-direction candidates, score them on validation prompts, select one, save it."""
    from ablate.config import DirectionConfig, apply_overrides, direction_preset_path, dump_config, load_config, validate_config
    from ablate.safety import check_output_dir, claim_output_dir

    check_output_dir(out, overwrite=overwrite, inputs=[model])

    if preset is not None:
        if config is not None:
            raise AblateError("give --config or --preset, not both")
        config = direction_preset_path(preset)
    if config is not None:
        settings = load_config(config, DirectionConfig, override or [])
    else:
        settings = validate_config(apply_overrides({}, override or [], "--set"), DirectionConfig, "--set")
    updates = {key: value for key, value in (("refusal_train", refusal), ("harmless_train", harmless)) if value}
    if updates:
        settings = validate_config({**settings.model_dump(mode="json"), **updates}, DirectionConfig, "command line")
    console.print(dump_config(settings), highlight=False)  # the resolved config, before any expensive work

    from ablate.config import DirectionRun
    from ablate.directions import load_sets
    from ablate.stages import run_direction

    load_sets(settings)  # a bad set name fails here, before the model loads
    model_config = model_config_from_options(model, device, quantization, device_map)
    claim_output_dir(out, "direction")
    # + out/compute.json: the stage's FLOPs and seconds
    selected = run_direction(DirectionRun(model=model_config, direction=settings, folder="."), out)["selected"]
    counts = ", ".join(f"{name} {count}" for name, count in selected["filter_counts"].items())
    stdout.print(
        f"selected {selected['variant']} direction: layer {selected['layer']}, position {selected['position']} "
        f"({selected['position_token']}); refusal score {selected['refusal_score']:.2f} (base {selected['base_refusal_score']:.2f}), "
        f"steering {selected['steering_score']:.2f}, KL {selected['kl']:.3f}"
        f"{' [FALLBACK]' if selected['fallback'] else ''}; filters: {counts}; {selected['wall_seconds']:.0f} s → {out}",
        highlight=False,
    )


@app.command()
def abliterate(
    model: str = typer.Argument(..., help="Model spec the direction was extracted from."),
    direction_dir: Path = typer.Option(..., "--direction", "-d", help="Directory written by `ablate direction`."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the orthogonalised model (loadable by transformers)."),
    device: str = typer.Option("cpu", help="Device for the weight edit."),
    overwrite: bool = overwrite_option("--out"),
    stream: Optional[bool] = typer.Option(None, "--stream/--in-memory", help="Read the original safetensors shard by shard (peak memory about one shard) or load the model; default: stream when the weights do not fit in free memory."),
) -> None:
    """Bake the selected direction's ablation into the weights and save a plain transformers model."""
    from ablate.config import ModelConfig
    from ablate.directions import load_direction
    from ablate.abliterate import abliterate as run_abliterate
    from ablate.safety import check_output_dir, claim_output_dir
    from ablate.streaming import too_large_for_memory

    check_output_dir(out, overwrite=overwrite, inputs=[direction_dir, model])
    load_direction(direction_dir)  # fails with one line before loading the model
    claim_output_dir(out, "abliterate")
    config = ModelConfig(spec=model, device=device)
    stream = too_large_for_memory(model) if stream is None else stream
    saved = run_abliterate(config, direction_dir, out, stream=stream)
    stdout.print(f"abliterated model saved → {saved} (load with AutoModelForCausalLM.from_pretrained)", highlight=False)
