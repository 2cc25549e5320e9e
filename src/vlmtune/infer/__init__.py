"""Prediction: load a base model + LoRA adapter, score candidate labels, generate, or run vLLM.

    engine.py          base model + adapter + processor, with the adapter's own image pixel limits
    scoring.py         label scoring: P(label | prompt) for a closed label set, no generation
    generation.py      greedy (or seeded sampling) generation, batched with left padding
    runner.py          the batch loop of `vlmtune predict` (images decoded one batch ahead) and the
                       transformers predictor
    vllm_backend.py    the same two modes on vLLM (GPU, tensor parallel, LoRA), imported lazily
    output.py          the resumable prediction JSONL and its `.meta.json` sidecar
    predict.py         a dataset into a prediction JSONL: `vlmtune predict`'s and do_predict's work
"""
