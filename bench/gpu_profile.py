"""Profile one dsr1 generate(max_new_tokens=1) on CUDA (tiny-125m random weights): where does prefill go?"""
import sys
import time

import torch

from dsr1.commands.bench import SHAPES, RandomWeights
from dsr1.config import load_config
from dsr1.models.llama import LlamaArgs
from dsr1.registry import PluginRegistry

shape = sys.argv[1] if len(sys.argv) > 1 else "tiny-125m"
hf = dict(SHAPES[shape])
pipeline = PluginRegistry.from_env().resolve(load_config(None, device="cuda"))
builder = pipeline.model_builder("llama")
builder.options = type(builder.options).model_validate({**builder.options.model_dump(), "dtype": "bfloat16"})
dev = torch.device("cuda")
model = builder.build_from(hf, RandomWeights(LlamaArgs.from_hf(hf).hf_tensor_shapes(), torch.bfloat16, dev), pipeline)
ids = torch.randint(100, 30000, (1, 128), device=dev)
pos = torch.arange(128, device=dev)[None]
for _ in range(3):
    model.generate(ids, max_new_tokens=1, ignore_eos=True)
for label, fn in [
    ("generate(1)", lambda: model.generate(ids, max_new_tokens=1, ignore_eos=True)),
    ("forward_step no cache", lambda: model.forward_step(ids, pos, 0, None, None, None, True)),
    ("forward (full logits)", lambda: model(ids)),
]:
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        print(f"{label:24s} {(time.perf_counter() - t) / 5 * 1e3:8.2f} ms", flush=True)
from torch.profiler import ProfilerActivity, profile

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    model.generate(ids, max_new_tokens=1, ignore_eos=True)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
