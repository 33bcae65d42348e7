"""Test-only hook: launched workers import this at start-up when tests put this folder on PYTHONPATH.

With PEFTKIT_TEST_RECORD_DIR set, each rank appends the examples of every training step to
`rank<R>.jsonl` (an example is the string of its unpadded token ids), so tests can check how data was sharded.
With PEFTKIT_TEST_HOLD_AT_STEP=k, rank 0 stops making progress once step k is done (its checkpoint written), so a
test can SIGKILL the job mid-run instead of racing the last steps of a tiny model.
With PEFTKIT_TEST_PARAM_BYTES_DIR set, each rank writes `rank<R>.json` after training: the bytes its 4-bit
(bitsandbytes) weights hold now — the local tensor (an FSDP shard) plus, under ZeRO-3, its own partition — and the bytes of
the whole weights.
With PEFTKIT_TEST_STEP_SECONDS=s, every process (launched or not) sleeps s seconds before each training step, so a
test that signals a tiny model's run at a given checkpoint does not race its last steps (the sleep is
interruptible: a SIGTERM handler still runs).
"""

import os

if os.environ.get("PEFTKIT_TEST_STEP_SECONDS"):
    import time

    import transformers

    _unpaced_step = transformers.Trainer.training_step
    _step_seconds = float(os.environ["PEFTKIT_TEST_STEP_SECONDS"])

    def paced_step(self, *args, **kwargs):
        time.sleep(_step_seconds)
        return _unpaced_step(self, *args, **kwargs)

    transformers.Trainer.training_step = paced_step

if "RANK" in os.environ and os.environ.get("PEFTKIT_TEST_PARAM_BYTES_DIR"):
    import json
    from pathlib import Path

    import transformers

    _train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        import bitsandbytes

        output = _train(self, *args, **kwargs)
        weights = [m.weight for m in self.model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
        local = [w.to_local() if hasattr(w, "to_local") else w.data for w in weights]  # FSDP2: this rank's shard
        partitions = [w.ds_tensor for w in weights if hasattr(w, "ds_tensor")]  # ZeRO-3: this rank's partition
        held = sum(t.numel() * t.element_size() for t in local + partitions)
        whole = sum(getattr(w, "ds_numel", w.numel()) * w.element_size() for w in weights)
        path = Path(os.environ["PEFTKIT_TEST_PARAM_BYTES_DIR"]) / f"rank{os.environ['RANK']}.json"
        path.write_text(json.dumps({"held": held, "whole": whole, "weights": len(weights)}))
        return output

    transformers.Trainer.train = train

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
