"""Test-only hook: launched workers import this at start-up when tests put this folder on PYTHONPATH.

With PEFTKIT_TEST_RECORD_DIR set, each rank appends the examples of every training step to
`rank<R>.jsonl` (an example is the string of its unpadded token ids), so tests can check how data was sharded.
With PEFTKIT_TEST_HOLD_AT_STEP=k, rank 0 stops making progress once step k is done (its checkpoint written), so a
test can SIGKILL the job mid-run instead of racing the last steps of a tiny model.
"""

import os

if "RANK" in os.environ and (os.environ.get("PEFTKIT_TEST_RECORD_DIR") or os.environ.get("PEFTKIT_TEST_HOLD_AT_STEP")):
    import json
    import time
    from pathlib import Path

    import transformers

    _training_step = transformers.Trainer.training_step
    _record_dir = os.environ.get("PEFTKIT_TEST_RECORD_DIR")
    _hold_at = int(os.environ.get("PEFTKIT_TEST_HOLD_AT_STEP") or -1)

    def training_step(self, model, inputs, *args, **kwargs):
        if self.state.global_step == _hold_at and os.environ["RANK"] == "0":
            time.sleep(3600)  # the other ranks wait in their next collective; the test kills everything
        if _record_dir:
            examples = [
                " ".join(map(str, ids[mask.bool()].tolist()))
                for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])
            ]
            with (Path(_record_dir) / f"rank{os.environ['RANK']}.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": self.state.global_step, "examples": examples}) + "\n")
        return _training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step
