"""Send a failed worker's error to the ErrorModal, for any widget or screen."""

from __future__ import annotations

from textual.message_pump import MessagePump
from textual.worker import Worker, WorkerState

from .messages import ShowError


class ReportsWorkerErrors(MessagePump):
    """Mix in before the Textual class: turns a worker's exception into ShowError.

    Worker.StateChanged does not bubble, so each owner of workers reports its own.
    """

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        error = event.worker.error
        if event.state is WorkerState.ERROR and error is not None:
            self.post_message(ShowError.from_exception(error))
