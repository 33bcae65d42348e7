"""Test-only hook: launched workers import this at start-up when tests put this folder on PYTHONPATH.

With PEFTKIT_TEST_RECORD_DIR set, each rank appends the examples of every training step to
`rank<R>.jsonl` (an example is the string of its unpadded token ids), so tests can check how data was sharded.
"""

import os

if os.environ.get("PEFTKIT_TEST_RECORD_DIR") and "RANK" in os.environ:
    import json
    from pathlib import Path

    import transformers

    _training_step = transformers.Trainer.training_step
    _record = Path(os.environ["PEFTKIT_TEST_RECORD_DIR"]) / f"rank{os.environ['RANK']}.jsonl"

    def training_step(self, model, inputs, *args, **kwargs):
        examples = [
            " ".join(map(str, ids[mask.bool()].tolist()))
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])
        ]
        with _record.open("a") as handle:
            handle.write(json.dumps({"step": self.state.global_step, "examples": examples}) + "\n")
        return _training_step(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = training_step
