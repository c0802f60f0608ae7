"""llama.cpp on the same weights at equal precision, for bench/generate.py (optional: needs llama-cpp-python).

The embedded model ships as a quantized GGUF; dscompile runs its dequantized float32 weights, so llama.cpp gets an
F32 GGUF written from the very same dequantized tensors (metadata copied as is), and both run the same numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def write_f32_gguf(source: Path, target: Path) -> Path:
    """An F32 copy of ``source`` (kept next to the model cache; written once, atomically)."""
    import gguf

    if target.exists():
        return target
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(target)
    return target


def decode_rate(model_path: Path, prompt: list[int], new: int, threads: int) -> dict[str, float]:
    """Greedy decoding of ``new`` tokens after ``prompt`` at batch 1: tokens/s from the first new token to the last,
    like the other systems (after one warm-up run)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=len(prompt) + new + 8, n_threads=threads, n_batch=512,
                verbose=False)

    def next_token() -> int:
        # llama-cpp-python keeps no scores unless logits_all: read the context's last row of logits.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def run() -> tuple[list[float], list[int], float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        times = [time.perf_counter()]
        for _ in range(new - 1):
            llm.eval([tokens[-1]])
            tokens.append(next_token())
            times.append(time.perf_counter())
        return times, tokens, times[0] - start

    run()
    times, tokens, first = run()
    return {"decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "first_token_s": first,
            "tokens": tokens}
