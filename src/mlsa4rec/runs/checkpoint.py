"""Checkpoint files: one self-verifying file per run, written atomically, loaded without pickled code.

Layout of ``checkpoint.pt``::

    MLSA4REC-CHECKPOINT 1 sha256=<64 hex digits>\\n      header line
    <torch.save payload>                                  tensors, dicts, lists, numbers, strings

The checksum covers the payload and sits inside the same file, so the pair can never be out of
step (a separate ``.sha256`` file written after the checkpoint could be, after a crash between
the two writes). A truncated or bit-flipped file fails the check before anything is unpickled,
and the payload is then read with ``torch.load(weights_only=True)``, which only rebuilds tensors
and plain containers: a checkpoint can never run code.

Random-number states are stored as JSON inside the payload (Python's, NumPy's global one, the
torch CPU and CUDA generators, base64 for the byte states), one entry per rank.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlsa4rec.config import known_keys
from mlsa4rec.data import REGISTRY, SequenceData, duplicates_mismatch
from mlsa4rec.errors import MLSA4RecError
from mlsa4rec.fileio import write_atomic

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# what a resumed run reads: checked after the checksum, before anything is used
STATE_KEYS = ("format", "meta", "model", "optimizer", "scheduler", "best_model")
META_KEYS = ("progress", "world_size", "rng", "config", "data_fingerprint")
_HEADER = re.compile(rb"^MLSA4REC-CHECKPOINT (\d+) sha256=([0-9a-f]{64})\n")


def encode(state: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``state``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return b"MLSA4REC-CHECKPOINT %d sha256=%s\n" % (FORMAT, hashlib.sha256(payload).hexdigest().encode()) + payload


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename)."""
    data = encode(state)

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    write_atomic(path, writer)


def verified_payload(path: str | os.PathLike[str]) -> bytes:
    """The payload of a checkpoint file after checking its header and checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MLSA4RecError(f"checkpoint {str(path)!r} does not exist") from None
    except OSError as exc:
        raise MLSA4RecError(f"cannot read checkpoint {str(path)!r}: {exc.strerror or exc}; check its permissions "
                            "(ls -l) or run as a user allowed to read it") from None
    match = _HEADER.match(data[:200])
    if not match:
        raise MLSA4RecError(f"checkpoint {str(path)!r} is damaged (its header is not an mlsa4rec checkpoint "
                            "header); it cannot be resumed: start the run over with --overwrite")
    if int(match.group(1)) != FORMAT:
        raise MLSA4RecError(f"checkpoint {str(path)!r} has format {int(match.group(1))}, this mlsa4rec reads "
                            f"format {FORMAT}; resume it with the mlsa4rec version that wrote it")
    payload = data[match.end():]
    if hashlib.sha256(payload).hexdigest() != match.group(2).decode():
        raise MLSA4RecError(f"checkpoint {str(path)!r} is corrupt or truncated (checksum mismatch, "
                            f"{len(data):,} bytes); it cannot be resumed: start the run over with --overwrite")
    return payload


def decode(payload: bytes, origin: str = "checkpoint") -> dict[str, Any]:
    """A verified payload back to the state dict (tensors and plain containers only)."""
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the checksum matched, so this is a foreign or incompatible file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MLSA4RecError(f"{origin} passed its checksum but cannot be read ({first}); start the run over "
                            "with --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MLSA4RecError(f"{origin} does not hold an mlsa4rec training state; start over with --overwrite")
    return state


def decode_training_state(payload: bytes, origin: str = "the checkpoint") -> dict[str, Any]:
    """:func:`decode`, then check that every entry a resumed run reads is there, so that a file
    whose checksum is valid but whose content is not a whole training state fails here, once."""
    state = decode(payload, origin)
    missing = [key for key in STATE_KEYS if key not in state]
    try:
        meta = json.loads(state["meta"]) if "meta" in state else {}
    except (TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        missing.append("meta (not a JSON object)")
    else:
        missing += [f"meta.{key}" for key in META_KEYS if key not in meta]
    if missing:
        raise MLSA4RecError(f"{origin} passed its checksum but lacks {', '.join(missing)} (written by another "
                            "version, or edited); it cannot be resumed: start the run over with --overwrite")
    return state


def load_training_state(trainer: Any, state: dict[str, Any]) -> None:
    """``trainer.load_state_dict(state)``, with any mismatch of a verified but unusable state (a
    tensor of another shape, an entry of the wrong type) reported as one clear error."""
    try:
        trainer.load_state_dict(state)
    except MLSA4RecError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise MLSA4RecError(f"the checkpoint passed its checksum but does not fit this run ({type(exc).__name__}: "
                            f"{first}); start the run over with --overwrite") from None


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    return decode(verified_payload(path), f"checkpoint {str(path)!r}")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's random-number states as plain JSON values."""
    version, mt, gauss = random.getstate()
    legacy = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(mt), gauss],
        "numpy": {**legacy, "state": {"key": legacy["state"]["key"].tolist(), "pos": legacy["state"]["pos"]}},
        "torch": _b64(torch.get_rng_state()),
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device).cpu())
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`capture_rng` (a CUDA state is skipped when resuming on a CPU)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    legacy = dict(state["numpy"])
    legacy["state"] = {"key": np.asarray(legacy["state"]["key"], dtype=np.uint32), "pos": legacy["state"]["pos"]}
    np.random.set_state(legacy)
    torch.set_rng_state(_unb64(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


# Settings that may change when a run is resumed: they steer when the run stops, how often it
# saves, how evaluation is batched (same metrics) or a stateless safeguard, not what the training
# steps compute. Everything else must match, or the resumed run would be a different experiment.
RESUMABLE_KEYS = ("epochs", "stopping_step", "checkpoint_steps", "eval_batch_size", "eval_item_chunk", "clip_grad_norm",
                  "dist_timeout")


def world_size_message(saved: int, now: int) -> str:
    return (f"the interrupted run trained with {saved} process(es) and cannot resume with {now}: the batches "
            f"are split per rank and every rank's random state is in the checkpoint; resume with {saved} "
            f"(--nproc {saved}, or torchrun giving WORLD_SIZE={saved})")


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else repr(value)


def check_resumable(state: dict[str, Any], config: Mapping[str, Any], fingerprint: str, world_size: int,
                    where: str, data: SequenceData | None = None) -> list[str]:
    """Raise if ``state`` cannot continue as a run with ``config`` (settings by key, as config.yaml
    holds them: saved and current are compared key by key) on the data of ``fingerprint``
    (``data``, when given, explains a mismatch due to dropped duplicates) and this world size;
    returns the changed resumable settings, as 'key old -> new' strings, for the log."""
    meta = json.loads(state["meta"])
    if meta["world_size"] != world_size:
        raise MLSA4RecError(world_size_message(meta["world_size"], world_size))
    if data is not None and (why := duplicates_mismatch(data, meta["data_fingerprint"], "the interrupted run")):
        raise MLSA4RecError(why)
    if meta["data_fingerprint"] != fingerprint:
        fix = ("point --data-dir at the original files" if config.get("dataset") in REGISTRY
               else "restore the original data file")
        raise MLSA4RecError("the data found differs from the data the interrupted run was trained on (checksum or "
                            f"filtering differ); {fix}")
    saved = dict(meta["config"])
    if (model := config.get("model")) is not None:  # a setting added after the checkpoint ran at its default
        saved.update({k: v for k, v in known_keys(model).items() if k not in saved})
    keys = list(saved) + [k for k in config if k not in saved]
    differ = [k for k in keys if saved.get(k, _MISSING) != config.get(k, _MISSING)]
    fixed = [k for k in differ if k not in RESUMABLE_KEYS]
    if fixed:
        shown = ", ".join(f"{k} (run: {_show(saved.get(k, _MISSING))}, now: {_show(config.get(k, _MISSING))})"
                          for k in fixed)
        raise MLSA4RecError(f"--resume continues a run with its own settings, but these differ: {shown}; repeat the "
                            f"original --config/--set (listed in {where}) or start over with --overwrite; only "
                            f"{', '.join(RESUMABLE_KEYS)} may change")
    if "epochs" in differ and config.get("lr_scheduler") != "constant":
        raise MLSA4RecError(f"epochs cannot change on --resume with lr_scheduler={config.get('lr_scheduler')}: the "
                            f"learning rate decays over all the epochs planned; keep epochs={saved['epochs']}")
    return [f"{k} {saved.get(k)!r} -> {config.get(k)!r}" for k in differ]
