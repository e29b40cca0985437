"""The one way the console starts workers, and the one way their errors show.

Every engine call runs in a thread worker made by ``background``; such a worker
never exits the app when it fails. Its owner mixes in ``ReportsWorkerErrors``,
which turns the failure into ``ShowError``, and the app puts that in the
ErrorModal. A test holds every worker of the console to this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar, cast

from textual import work
from textual.message_pump import MessagePump
from textual.worker import Worker, WorkerState

from .messages import ShowError

P = ParamSpec("P")
R = TypeVar("R")


def background(
    *, group: str, exclusive: bool = True
) -> Callable[[Callable[P, R]], Callable[P, Worker[R]]]:
    """Run the decorated method in a thread worker of ``group``; its errors go to the modal.

    ``exclusive`` cancels the group's running worker when a new one starts.
    """
    decorator = work(thread=True, exclusive=exclusive, group=group, exit_on_error=False)
    return cast(Callable[[Callable[P, R]], Callable[P, Worker[R]]], decorator)


class ReportsWorkerErrors(MessagePump):
    """Mix in before the Textual class: turns a worker's exception into ShowError.

    Worker.StateChanged does not bubble, so each owner of workers reports its own.
    """

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        error = event.worker.error
        if event.state is WorkerState.ERROR and error is not None:
            self.post_message(ShowError.from_exception(error))
