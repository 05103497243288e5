"""Live progress (rich): start-up's phases, then a bar with loss, accuracy and samples/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class StartupStatus:
    """A spinner with what start-up is doing and for how long; gone once training
    starts.  Loading data, then (Ray) starting Ray, placing and starting the actors:
    tens of seconds with many actors, which would otherwise pass in silence."""

    def __init__(self, enabled: bool = True):
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=Console(stderr=True),
                                  transient=True, disable=not enabled)
        self._task = None

    def __enter__(self) -> "StartupStatus":
        self._progress.start()
        self._task = self._progress.add_task("loading the data and building the model")
        return self

    def phase(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def __exit__(self, *exc) -> None:
        self._progress.stop()


class TrainProgress:
    def __init__(self, total: int, enabled: bool = True, initial: int = 0):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  "
                       "{task.fields[sps]} samples/s"),
            TimeRemainingColumn(), console=self.console, disable=not enabled, transient=False)
        self._task = self._progress.add_task("train", total=total, completed=initial,
                                             loss="-", acc="-", sps="-")
        if enabled:
            self._progress.start()

    def update(self, loss: float, acc: float, samples_per_s: float) -> None:
        self._progress.update(self._task, advance=1, loss=_loss(loss), acc=f"{acc:.3f}",
                              sps=f"{samples_per_s:.0f}")

    def note(self, text: str) -> None:
        """A line above the bar (e.g. the metrics endpoint's URL); printed with the bar
        off too."""
        self._progress.console.print(text)

    def epoch_done(self, epoch: int, epochs: int, line: dict, seconds: float) -> None:
        """One line per epoch above the bar: what a long run's log is read for."""
        if self.enabled:
            self._progress.console.print(
                f"epoch {epoch + 1}/{epochs}: train loss {_loss(line['train_loss'])}  "
                f"test loss {_loss(line['test_loss'])}  test accuracy "
                f"{line['test_accuracy']:.4f}  ({seconds:.0f} s)")

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()


def _loss(x: float) -> str:
    """Three decimals, as long as that stays short: a diverging loss is 7.44e+18, not
    nineteen digits that push the rest of the bar off the line."""
    return f"{x:.3f}" if abs(x) < 1e4 else f"{x:.3g}"
