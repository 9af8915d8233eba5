"""Record the greedy and seeded outputs of the engine on a fixed random model and fixed prompts.

Run once, with the static-batch and slot-cache loops that the paged engine replaced (commit
e47e858), to make ``engine_reference.json``; ``tests/test_paged_engine.py`` holds the new engine
to it. ``.venv/bin/python tests/data/record_engine_reference.py``
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reference_model import PROMPTS, SAMPLING, save_reference_model  # noqa: E402


def main() -> None:
    from tpserve import LLM, SamplingParams
    from tpserve.engine.serving import ServingEngine

    out: dict = {"prompts": PROMPTS, "static": {}, "slots": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_reference_model(Path(tmp) / "model")
        for tp in (1, 2):
            with LLM(path, tensor_parallel_size=tp) as llm:
                out["static"][tp] = {name: [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**kw))]
                                     for name, kw in SAMPLING.items()}
        engine = ServingEngine(path, max_batch=4)
        try:
            import threading

            for name, kw in SAMPLING.items():
                got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
                done = threading.Semaphore(0)

                def sink(i):
                    def on_event(ev):
                        got[i].extend(ev.token_ids)
                        if ev.finish_reason is not None:
                            done.release()
                    return on_event

                for i, p in enumerate(PROMPTS):
                    engine.submit(p, SamplingParams(**kw), sink(i))
                for _ in PROMPTS:
                    done.acquire(timeout=120)
                out["slots"][name] = [got[i] for i in range(len(PROMPTS))]
        finally:
            engine.close()
    target = Path(__file__).with_name("engine_reference.json")
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
