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
        self._progress.update(self._task, advance=1, loss=f"{loss:.3f}", acc=f"{acc:.3f}",
                              sps=f"{samples_per_s:.0f}")

    def note(self, text: str) -> None:
        """A line above the bar (e.g. the metrics endpoint's URL); printed with the bar
        off too."""
        self._progress.console.print(text)

    def epoch_done(self, epoch: int, test_acc: float) -> None:
        if self.enabled:
            self._progress.console.print(f"epoch {epoch}: test accuracy {test_acc:.4f}")

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
