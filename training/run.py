"""train -> publish -> export: the one place where the stages meet.

The recipe (training/recipe/) fine-tunes and scores the model; publishing (training/publish/) writes the
artifact; export (training/export/) adds the gated ONNX files. Each stage knows nothing of the others; this
module hands one's result to the next, on the main process, and closes the run's trackers at the end.
"""

from __future__ import annotations

from collections.abc import Callable

from training.config import Config
from training.recipe.loop import RunResult, fine_tune
from training.recipe.tracking import RunLabels, closes_failed_runs


@closes_failed_runs
def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, labels: RunLabels | None = None,
        publish: bool = True, on_evaluation: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Fine-tune, evaluate, publish ``OUTPUT_DIR/artifact`` and export it (unless ``export.onnx: false``).

    The arguments are :func:`training.recipe.loop.fine_tune`'s; ``publish=False`` stops after training (a search's
    trial), with no artifact and the test split never touched.

    Raises:
        TrainingError, ConfigError: as :func:`training.recipe.loop.fine_tune`.
        ExportError: the export's gate refused the ONNX model (the artifact is published; its earlier ONNX
            files, if any, stay as they were).
    """
    trained = fine_tune(cfg, resume=resume, overwrite=overwrite, labels=labels, publish=publish,
                        on_evaluation=on_evaluation)
    result, accelerator = trained.result, trained.accelerator
    if publish and accelerator.is_main_process:
        # imports matplotlib; keep it off the import path of runs that don't publish
        from training.publish.artifact import publish_artifact

        result.artifact_dir = publish_artifact(cfg, trained.model, trained.built, trained.data, result,
                                               result.training_info)
        if cfg.export.onnx:
            from training.export import HeldOut, export_artifact

            result.export = export_artifact(result.artifact_dir, int8=cfg.export.int8,  # the gate: cfg.export's
                                            held_out=HeldOut.from_splits(trained.data.validation, trained.data.train))
        trained.tracking.log_results(result, step=trained.step)  # test metrics, baselines, plots, the manifest
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained.tracking.close()
    return result
