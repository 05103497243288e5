"""A live progress bar (rich) with loss, accuracy and samples/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, enabled: bool = True, initial: int = 0):
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  "
                       "{task.fields[sps]:.0f} samples/s"),
            TimeRemainingColumn(), console=self.console, disable=not enabled, transient=False)
        self._task = self._progress.add_task("train", total=total, completed=initial,
                                             loss=float("nan"), acc=float("nan"), sps=0.0)
        if enabled:
            self._progress.start()

    def update(self, loss: float, acc: float, samples_per_s: float) -> None:
        self._progress.update(self._task, advance=1, loss=loss, acc=acc, sps=samples_per_s)

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
