"""Where training metrics go: a console progress bar, wandb (offline by default), a JSONL file.

The trainer talks to one `MetricsLogger`; combine several with `MultiLogger`. Nothing here
receives credentials or storage options: only metric names, numbers and the run config.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleLogger:
    """A tqdm progress bar over steps, with the latest loss, FVU, L0 and dead fraction."""

    def __init__(self, total_steps: int | None = None, initial_step: int = 0, disable: bool = False) -> None:
        self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=disable)
        self._last_step = initial_step

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.bar.update(max(0, step - self._last_step))
        self._last_step = step
        keys = ("loss", "fvu", "l0", "dead_fraction", "tokens_per_s")
        shown = {k: f"{metrics[k]:.4g}" for k in keys if k in metrics}
        self.bar.set_postfix(shown, refresh=False)

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        return None

    def close(self) -> None:
        self.bar.close()


class JsonlLogger:
    """One JSON object per logged step, appended to a local file (easy to grep and to test)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._fh = open(path, "a", buffering=1)  # noqa: SIM115 - held open for the run, closed in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if isinstance(v, (int, str)) or math.isfinite(v) else None) for k, v in metrics.items()}
        self._fh.write(json.dumps({"step": step, **clean}) + "\n")

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        counts, edges = torch.histogram(values.float().cpu(), bins=40)
        self._fh.write(
            json.dumps({"step": step, "histogram": name, "counts": counts.tolist(), "edges": edges.tolist()}) + "\n"
        )

    def close(self) -> None:
        self._fh.close()


class WandbLogger:
    """wandb run; `mode="offline"` (the default) writes under `dir` and syncs later with `wandb sync`."""

    def __init__(
        self,
        project: str = "saescale",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        config: dict[str, Any] | None = None,
        mode: str = "offline",
        dir: str | None = None,
        run_id: str | None = None,
    ) -> None:
        """`run_id` makes a restarted or resumed run continue the same wandb run."""
        import wandb

        self._wandb = wandb
        if dir:
            os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            group=group,
            tags=tags,
            config=config,
            mode=mode,
            dir=dir,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        # dead-latent and loss curves are plotted against tokens, like the paper's figures
        self.run.define_metric("tokens")
        for key in ("loss", "fvu", "dead_fraction", "auxk_loss", "l0"):
            self.run.define_metric(key, step_metric="tokens")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        counts, edges = torch.histogram(values.float().cpu(), bins=40)
        hist = self._wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))
        self.run.log({name: hist}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    def __init__(self, *loggers: MetricsLogger) -> None:
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        for lg in self.loggers:
            lg.log_histogram(name, values, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        return None

    def close(self) -> None:
        return None
