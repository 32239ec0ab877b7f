"""The run-folder record: what produced a run, written to `<run folder>/run.json` when it starts.

It holds the full resolved config (every key, flattened: "OPTIM.LR"), the train.py command line
and the config files' hashes (the request), the method's settings, the backbone (name, file,
fingerprint of the weights), the dataset and split (classes, images per split, shots used) and the
config keys the trainer reads under TRAINER. train.py writes it and refuses to resume a run with
other options; vlprompt.run and the sweep read it to skip a finished run only when it was made
with the options asked now; parse_test_res.py and the report print what it says a number used
where that differs from its folder's name (fewer shots than asked).

Framework-free: the config comes in as a nested mapping (a yacs CfgNode is a dict).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import UserError
from ..files import atomic_write_text

RECORD_FILE = "run.json"
FORMAT = "vlprompt-run-1"

# Keys that cannot change a run's numbers: where things are and how they are shown, not what is
# computed. (Data location: the dataset and its split sizes are recorded and compared separately.)
HARMLESS = frozenset({
    "OUTPUT_DIR", "RESUME", "DATASET.ROOT", "DATALOADER.NUM_WORKERS", "TRAIN.PRINT_FREQ", "VERBOSE",
    "USE_CUDA", "MODEL.FEATURE_CACHE_DIR", "TEST.CACHE_FROZEN_FEATURES", "MODEL.BACKBONE.DOWNLOAD_ROOT",
})
# The evaluation batch size changes nothing for a method whose evaluation logits do not depend on
# the batch (every trainer here evaluates in eval mode, image by image): recorded per run.
EVAL_BATCH = "DATALOADER.TEST.BATCH_SIZE"
FILE_FLAGS = ("--config-file", "--dataset-config-file")


class ChangedRun(UserError):
    """A run folder holds a run made with other options than the ones asked now."""


def flatten(node: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"OPTIM.LR": 0.002, ...} from a nested config, values as JSON keeps them (tuples as lists)."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return json.loads(json.dumps(flat, default=str))


def _sha256(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return ""


def request(argv: Sequence[str]) -> Dict[str, Any]:
    """What was asked: train.py's arguments (without --restart) and the hashes of the config files
    they name, so an edited config file is a different request."""
    argv = [a for a in argv if a != "--restart"]
    files = {argv[i + 1]: _sha256(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in FILE_FLAGS}
    return {"argv": argv, "files": files}


def path(folder: str) -> str:
    return os.path.join(folder, RECORD_FILE)


def read(folder: str) -> Optional[dict]:
    """The folder's record, or None (no record: a run started before records, or no run)."""
    try:
        with open(path(folder)) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def write(folder: str, record: dict) -> None:
    atomic_write_text(path(folder), json.dumps({"format": FORMAT, **record}, indent=1, default=str) + "\n")


def has_run(folder: str) -> bool:
    """Whether a run started in `folder` before (a record, a log or a checkpoint folder)."""
    if not os.path.isdir(folder):
        return False
    return any(name == RECORD_FILE or name.startswith("log.txt") or os.path.isdir(os.path.join(folder, name))
               for name in os.listdir(folder))


@dataclass
class Changes:
    relevant: List[Tuple[str, Any, Any]] = field(default_factory=list)  # (key, recorded, now)
    harmless: List[Tuple[str, Any, Any]] = field(default_factory=list)

    @staticmethod
    def _text(items) -> str:
        return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in items)

    def relevant_text(self) -> str:
        return self._text(self.relevant)

    def harmless_note(self) -> str:
        return ("" if not self.harmless else
                f"note: options that cannot change the results differ from the run's start: "
                f"{self._text(self.harmless)}")


def harmless_key(key: str, record: Mapping[str, Any]) -> bool:
    if key in HARMLESS or (key == EVAL_BATCH and record.get("batch_independent_eval")):
        return True
    # TRAINER keys the trainer does not read (another method's node) cannot change its numbers
    return key.startswith("TRAINER.") and key != "TRAINER.NAME" and key[len("TRAINER."):] not in record.get("reads", [])


def compare(recorded: Mapping[str, Any], config: Mapping[str, Any]) -> Changes:
    """How `config` (flattened) differs from the recorded run's config."""
    old = recorded.get("config", {})
    changes = Changes()
    for key in sorted(set(old) | set(config)):
        before, now = old.get(key, "<absent>"), config.get(key, "<absent>")
        if before != now:
            (changes.harmless if harmless_key(key, recorded) else changes.relevant).append((key, before, now))
    return changes


def refusal(folder: str, changes: Changes, finished: bool) -> ChangedRun:
    what = "a finished run" if finished else "an unfinished run"
    return ChangedRun(
        f"{folder} holds {what} made with other options: {changes.relevant_text()} (recorded -> now). "
        f"Its results would carry options that did not produce them. Either rerun with the options it was "
        f"started with (all of them in {path(folder)}), or use a new output folder (OUTPUT=... / --output-dir) "
        f"or add --restart to discard that run and start over.")


def check_backbone(folder: str, recorded: Mapping[str, Any], fingerprint: Optional[str]) -> None:
    """The backbone's weights must be those the run started with (a file replaced in place)."""
    before = (recorded.get("backbone") or {}).get("fingerprint")
    if before and fingerprint and before != fingerprint:
        raise ChangedRun(f"{folder} holds a run started with other backbone weights (fingerprint {before[:12]}, "
                         f"now {fingerprint[:12]}: MODEL.BACKBONE's file changed). Restore those weights, or use a "
                         f"new output folder or --restart.")


def notes(record: Optional[Mapping[str, Any]]) -> List[str]:
    """What a run's numbers used that its folder name does not say (for parse_test_res and the report)."""
    if not record:
        return []
    dataset = record.get("dataset") or {}
    asked, used = dataset.get("num_shots"), dataset.get("shots_used")
    if isinstance(asked, int) and isinstance(used, int) and asked > 0 and used < asked:
        return [f"{used} of {asked} shots per class for some classes (DATASET.ALLOW_FEWER_SHOTS)"]
    return []
