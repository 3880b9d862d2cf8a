"""The control messages between the engine's controller and its workers (mooncake mode)."""
from __future__ import annotations

from .control import MESSAGE_FIELDS, register_message

# controller -> worker (each carries an "id" its reply repeats)
COMMANDS = {
    "init": ("id", "config", "dtype", "seed", "num_ranks", "slots_per_rank", "max_rows", "phy2log", "log2phy",
             "active", "exchange_timeout", "heartbeat_endpoint", "heartbeat_interval", "incarnation"),
    "compile": ("id", "shapes"),
    # a step's per-row inputs (runtime/step.py input_rows); a prefill step adds decode_<name> ones.
    # "epoch" (step, install, load, commit): the epoch the controller sends it in; a worker in another
    # epoch refuses a step, load or commit, and a step's reply carries the worker's epoch, which the
    # controller checks the same way
    "step": ("id", "epoch", "shape", "step", "tokens", "positions", "valid", "slot", "last", "seeds", "sample_ids",
             "temperature", "top_p"),
    "install": ("id", "epoch", "peers", "active", "log2phy"),
    "load": ("id", "epoch", "loads"),
    "commit": ("id", "epoch"),
    "fault": ("id", "how"),
}
# controller -> worker, no reply: "the controller is alive" (a worker exits after its idle timeout
# without a word; at 32 ranks on 2 cores the others' init or compile can take longer than that)
KEEPALIVE = {"ping": ()}
# worker -> controller
NOTES = {"hello": ("rank", "pid"), "reply": ("rank", "id", "ok")}


def register_messages():
    for name, fields in {**COMMANDS, **KEEPALIVE, **NOTES}.items():
        if MESSAGE_FIELDS.get(name) != frozenset(fields):
            register_message(name, fields)   # raises if the name is taken with other fields
